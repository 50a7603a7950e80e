//! Reading and writing numpy `.npy` files (format version 1.0), the on-disk
//! form of every array procjob shares between processes.
//!
//! A `.npy` file is a 10-byte preamble (magic `\x93NUMPY`, version `1 0`, a
//! little-endian `u16` header length), an ASCII Python dict literal such as
//! `{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }` padded with
//! spaces and a final `\n`, and then the raw C-order element bytes. Workers
//! memory-map the data part, so the validation here is strict: only the three
//! little-endian dtypes of [`DType`], only C order, only data offsets that keep
//! elements aligned, and a file length that matches the header exactly.
//!
//! The header parser is a small hand-written reader of exactly the dict
//! literal numpy writes; it never panics and never allocates more than the
//! header bytes it was handed, which are capped at [`MAX_HEADER_LEN`] before
//! anything is read from a file.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::dtype::DType;

/// The six bytes every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Data offset alignment: the header is padded so data starts at a multiple of this.
pub const ALIGN: usize = 64;
/// Largest header we accept (bytes before the data); checked before allocating.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Data offsets of files we read must be a multiple of this, so that elements
/// (aligned to at most 8 bytes) are aligned in a page-aligned memory map. numpy itself
/// aligns to 64 (16 in old versions); we accept anything that is safe.
pub const MIN_DATA_ALIGN: usize = 8;
/// Most dimensions a shape may have (numpy's own limit, `NPY_MAXDIMS`).
pub const MAX_NDIM: usize = 64;

/// Length of the fixed preamble: magic, two version bytes, `u16` header length.
const PREAMBLE_LEN: usize = MAGIC.len() + 2 + 2;

/// A validated `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type of the array.
    pub dtype: DType,
    /// Shape of the array, in C (row-major) order; empty for a 0-d array.
    pub shape: Vec<usize>,
    /// Byte offset of the first element in the file (preamble plus header).
    pub data_offset: usize,
}

impl NpyHeader {
    /// Number of data bytes: element size times the product of the shape.
    ///
    /// Saturates at `usize::MAX` if the shape overflows; headers returned by
    /// [`parse_header`] never do, but the fields are public.
    pub fn data_len(&self) -> usize {
        self.dtype.nbytes(&self.shape).unwrap_or(usize::MAX)
    }

    /// Number of elements (product of the shape; 1 for a 0-d array).
    pub fn len(&self) -> usize {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).unwrap_or(usize::MAX)
    }

    /// Whether the array has no elements (some dimension is 0).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total file length this header implies: `data_offset + data_len()`.
    pub fn file_len(&self) -> u64 {
        (self.data_offset as u64).saturating_add(self.data_len() as u64)
    }
}

/// Problem with the header bytes themselves (pure; no file involved). Each
/// message names the problem and what is accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeaderError {
    /// The bytes do not start with `\x93NUMPY`.
    #[error(
        "missing the .npy magic bytes \\x93NUMPY at the start \
         (an .npz archive or raw binary file is not accepted; save with numpy.save)"
    )]
    BadMagic,
    /// A format version other than 1.0.
    #[error("unsupported .npy format version {major}.{minor}; only .npy format 1.0 is accepted")]
    UnsupportedVersion {
        /// Major version byte found.
        major: u8,
        /// Minor version byte found.
        minor: u8,
    },
    /// Fewer bytes than the preamble or the declared header length require.
    #[error("truncated: the header needs {needed} bytes but only {got} are present")]
    Truncated {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes that were present.
        got: usize,
    },
    /// The declared header is longer than [`MAX_HEADER_LEN`].
    #[error("header is {len} bytes long; at most {max} bytes are accepted", max = MAX_HEADER_LEN)]
    TooLong {
        /// Declared header length including the 10-byte preamble.
        len: usize,
    },
    /// A byte outside ASCII in the header dict (version 1.0 headers are ASCII).
    #[error("header has a non-ASCII byte at offset {offset}; .npy 1.0 headers are ASCII")]
    NotAscii {
        /// File offset of the first offending byte.
        offset: usize,
    },
    /// The header is not the Python dict literal numpy writes.
    #[error(
        "malformed header dict: {0}; expected a dict like \
         {{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }}"
    )]
    Malformed(String),
    /// One of the three required keys is absent.
    #[error("header has no '{0}' key; a .npy header needs 'descr', 'fortran_order' and 'shape'")]
    MissingKey(&'static str),
    /// A dtype other than the accepted ones ([`DType::ALL`]).
    #[error("unsupported dtype '{descr}'; accepted are {}", accepted_dtypes())]
    UnsupportedDtype {
        /// The `descr` value found in the header.
        descr: String,
    },
    /// One of the accepted dtypes, but big-endian.
    #[error(
        "big-endian data ('{descr}') is not accepted; convert with arr.astype('{}')",
        little_endian_descr(.descr)
    )]
    NonNativeByteOrder {
        /// The `descr` value found in the header.
        descr: String,
    },
    /// `fortran_order` is `True`.
    #[error("Fortran-order arrays are not accepted; save np.ascontiguousarray(a)")]
    FortranOrder,
    /// The shape's size in bytes (plus the header) does not fit the address space.
    #[error("a {dtype} array of shape {shape} has more bytes than this process can address")]
    ShapeOverflow {
        /// The header's dtype.
        dtype: DType,
        /// The header's shape, as written there (its entries may not fit
        /// in `usize`).
        shape: String,
    },
    /// The data would start at an offset that is not a multiple of [`MIN_DATA_ALIGN`].
    #[error(
        "data starts at byte {offset}, which is not a multiple of {align}, so \
         elements cannot be read in place; re-save the array with numpy.save",
        align = MIN_DATA_ALIGN
    )]
    MisalignedData {
        /// The data offset implied by the header length.
        offset: usize,
    },
}

/// "'|i1' (i8), '<i2' (i16), …", built from [`DType::ALL`] so the message
/// cannot drift from what is actually accepted.
fn accepted_dtypes() -> String {
    DType::ALL.iter().map(|d| format!("'{}' ({})", d.npy_descr(), d.name())).collect::<Vec<_>>().join(", ")
}

/// `'>f8'` → `'<f8'`, for the conversion hint of big-endian errors.
fn little_endian_descr(descr: &str) -> String {
    match descr.strip_prefix(['>', '=']) {
        Some(rest) => format!("<{rest}"),
        None => descr.to_owned(),
    }
}

/// Validates the 10-byte preamble and returns the total header length
/// (preamble plus dict), i.e. the data offset. Only needs the first 10 bytes,
/// which is what lets [`read_header`] check the length before reading more.
fn parse_preamble(bytes: &[u8]) -> Result<usize, HeaderError> {
    // Compare whatever prefix of the magic is present first, so that a short
    // non-.npy file is reported as such rather than as truncated.
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(HeaderError::BadMagic);
    }
    if let [_, _, _, _, _, _, major, minor, ..] = *bytes {
        if (major, minor) != (1, 0) {
            return Err(HeaderError::UnsupportedVersion { major, minor });
        }
    }
    let [_, _, _, _, _, _, _, _, lo, hi, ..] = *bytes else {
        return Err(HeaderError::Truncated { needed: PREAMBLE_LEN, got: bytes.len() });
    };
    let len = PREAMBLE_LEN + usize::from(u16::from_le_bytes([lo, hi]));
    if len > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong { len });
    }
    Ok(len)
}

/// Parses the header at the start of `bytes` (the first bytes of a file; may
/// be longer than the header).
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader, HeaderError> {
    let data_offset = parse_preamble(bytes)?;
    let Some(dict) = bytes.get(PREAMBLE_LEN..data_offset) else {
        return Err(HeaderError::Truncated { needed: data_offset, got: bytes.len() });
    };
    if let Some(i) = dict.iter().position(|b| !b.is_ascii()) {
        return Err(HeaderError::NotAscii { offset: PREAMBLE_LEN + i });
    }

    // Syntax first, then meaning: a file that is both malformed and of the
    // wrong dtype is reported as malformed, which is the more basic problem.
    let fields = DictParser { s: dict, pos: 0, base: PREAMBLE_LEN }.parse()?;
    let descr = fields.descr.ok_or(HeaderError::MissingKey("descr"))?;
    let fortran_order = fields.fortran_order.ok_or(HeaderError::MissingKey("fortran_order"))?;
    let shape = fields.shape.ok_or(HeaderError::MissingKey("shape"))?;

    let dtype = dtype_from_descr(descr)?;
    if fortran_order {
        return Err(HeaderError::FortranOrder);
    }
    let overflow = || HeaderError::ShapeOverflow { dtype, shape: fields.shape_text.to_string() };
    let shape = shape.ok_or_else(overflow)?;
    // Slices (and so memory maps viewed as slices) may not exceed isize::MAX
    // bytes; checking here means every later size computation is safe.
    let data_len = dtype.nbytes(&shape).ok_or_else(overflow)?;
    match data_offset.checked_add(data_len) {
        Some(total) if total <= isize::MAX as usize => {}
        _ => return Err(overflow()),
    }
    if data_offset % MIN_DATA_ALIGN != 0 {
        return Err(HeaderError::MisalignedData { offset: data_offset });
    }
    Ok(NpyHeader { dtype, shape, data_offset })
}

/// Maps a `descr` string to a dtype, telling a wrong byte order apart from an
/// unsupported type because the fix the user needs differs.
fn dtype_from_descr(descr: &str) -> Result<DType, HeaderError> {
    let unsupported = || HeaderError::UnsupportedDtype { descr: descr.to_owned() };
    let (order, code) = match descr.as_bytes().first() {
        Some(b'<' | b'>' | b'=' | b'|') => descr.split_at(1),
        _ => return Err(unsupported()),
    };
    let Some(dtype) = DType::ALL.into_iter().find(|d| &d.npy_descr()[1..] == code) else {
        return Err(unsupported());
    };
    // One-byte types have no byte order: numpy writes '|', and reads any.
    if dtype.size() == 1 {
        return Ok(dtype);
    }
    let little = match order {
        "<" => true,
        ">" => false,
        // '=' is "native": only the same bytes as '<' on a little-endian host.
        "=" => cfg!(target_endian = "little"),
        // '|' means "byte order not applicable", which numpy only writes for
        // one-byte types; on a wider type it is not something numpy
        // produces, so refuse it rather than guess.
        _ => return Err(unsupported()),
    };
    if little {
        Ok(dtype)
    } else {
        Err(HeaderError::NonNativeByteOrder { descr: descr.to_owned() })
    }
}

/// The three fields of a header dict, each `None` until seen. `shape` is
/// `Some(None)` when an entry overflowed `usize` (reported after the whole
/// dict has been checked for syntax).
#[derive(Default)]
struct DictFields<'a> {
    descr: Option<&'a str>,
    fortran_order: Option<bool>,
    shape: Option<Option<Vec<usize>>>,
    /// The shape's tuple as written, for messages.
    shape_text: &'a str,
}

/// Cursor over the header dict bytes (already known to be ASCII).
struct DictParser<'a> {
    s: &'a [u8],
    pos: usize,
    /// File offset of `s[0]`, so error messages point into the file.
    base: usize,
}

impl<'a> DictParser<'a> {
    fn err(&self, what: &str) -> HeaderError {
        HeaderError::Malformed(format!("{what} at byte {}", self.base + self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    /// Skips Python whitespace (what `ast.literal_eval` would skip inside braces).
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8, what: &str) -> Result<(), HeaderError> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn parse(mut self) -> Result<DictFields<'a>, HeaderError> {
        let mut fields = DictFields::default();
        self.expect(b'{', "expected '{' at the start of the header")?;
        loop {
            self.skip_ws();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                break;
            }
            let key_pos = self.pos;
            let key = self.string("expected a quoted key or '}'")?;
            self.skip_ws();
            self.expect(b':', "expected ':' after a key")?;
            self.skip_ws();
            let duplicate = match key {
                "descr" => fields.descr.replace(self.descr()?).is_some(),
                "fortran_order" => fields.fortran_order.replace(self.boolean()?).is_some(),
                "shape" => {
                    let start = self.pos;
                    let shape = self.shape()?;
                    fields.shape_text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("(…)");
                    fields.shape.replace(shape).is_some()
                }
                _ => {
                    self.pos = key_pos;
                    return Err(self.err(&format!(
                        "unexpected key '{key}' (only 'descr', 'fortran_order' and 'shape' \
                         are allowed)"
                    )));
                }
            };
            if duplicate {
                self.pos = key_pos;
                return Err(self.err(&format!("duplicate key '{key}'")));
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err("expected ',' or '}' after a value")),
            }
        }
        // numpy pads with spaces and ends with '\n'; anything else after the
        // closing brace means the header length or the dict is wrong.
        self.skip_ws();
        if self.pos != self.s.len() {
            return Err(self.err("unexpected text after the closing '}'"));
        }
        Ok(fields)
    }

    /// A single- or double-quoted string without escapes (no valid `descr` or
    /// key needs one, so a backslash is treated as an error, not interpreted).
    fn string(&mut self, what: &str) -> Result<&'a str, HeaderError> {
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(self.err(what)),
        };
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                Some(b) if b == quote => break,
                Some(b'\\') => return Err(self.err("escape sequences in strings are not accepted")),
                Some(b'\n' | b'\r') | None => return Err(self.err("unterminated string")),
                Some(_) => self.pos += 1,
            }
        }
        let text = &self.s[start..self.pos];
        self.pos += 1;
        // The whole dict was checked to be ASCII, so this cannot fail; map it
        // to an error anyway rather than unwrap.
        std::str::from_utf8(text).map_err(|_| self.err("invalid string"))
    }

    /// The `descr` value: normally a string; a list or tuple is a structured
    /// dtype, which is skipped over and reported as unsupported by the caller.
    fn descr(&mut self) -> Result<&'a str, HeaderError> {
        match self.peek() {
            Some(b'[' | b'(') => self.balanced(),
            _ => self.string("expected a quoted dtype string after 'descr'"),
        }
    }

    /// Skips a bracketed Python literal (lists/tuples of strings and numbers,
    /// as structured `descr`s are) and returns its text.
    fn balanced(&mut self) -> Result<&'a str, HeaderError> {
        let start = self.pos;
        let mut depth = 0usize;
        loop {
            match self.peek() {
                Some(b'[' | b'(') => {
                    depth += 1;
                    self.pos += 1;
                }
                Some(b']' | b')') => {
                    self.pos += 1;
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                Some(b'\'' | b'"') => {
                    self.string("unterminated string")?;
                }
                Some(b'{' | b'}') | None => {
                    return Err(self.err("unbalanced brackets in 'descr'"));
                }
                Some(_) => self.pos += 1,
            }
        }
        std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| self.err("invalid descr"))
    }

    fn boolean(&mut self) -> Result<bool, HeaderError> {
        let rest = &self.s[self.pos..];
        let word_len = rest.iter().position(|b| !(b.is_ascii_alphanumeric() || *b == b'_')).unwrap_or(rest.len());
        let value = match &rest[..word_len] {
            b"True" => true,
            b"False" => false,
            _ => return Err(self.err("'fortran_order' must be True or False")),
        };
        self.pos += word_len;
        Ok(value)
    }

    /// A tuple of non-negative integers: `()`, `(5,)`, `(3, 4)`, `(3, 4,)`.
    /// Returns `None` inside if an entry overflows `usize`.
    fn shape(&mut self) -> Result<Option<Vec<usize>>, HeaderError> {
        self.expect(b'(', "'shape' must be a tuple like (3, 4), (5,) or ()")?;
        let mut dims = Vec::new();
        let mut overflow = false;
        self.skip_ws();
        if self.peek() == Some(b')') {
            self.pos += 1;
            return Ok(Some(dims));
        }
        loop {
            if dims.len() == MAX_NDIM {
                return Err(self.err(&format!("more than {MAX_NDIM} dimensions in 'shape'")));
            }
            match self.integer()? {
                Some(d) => dims.push(d),
                None => {
                    // Keep a placeholder so the count stays right for the
                    // 1-tuple check; the shape is discarded anyway.
                    overflow = true;
                    dims.push(0);
                }
            }
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_ws();
                    if self.peek() == Some(b')') {
                        self.pos += 1;
                        break;
                    }
                }
                // In Python `(5)` is the integer 5, not a tuple; numpy never
                // writes it and refuses to read it.
                Some(b')') if dims.len() == 1 => {
                    return Err(self.err("a 1-d shape needs a trailing comma, like (5,)"));
                }
                Some(b')') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err(self.err("expected ',' or ')' in 'shape'")),
            }
        }
        Ok((!overflow).then_some(dims))
    }

    /// A decimal integer without sign or leading zeros (Python 3 syntax), with
    /// an optional `L` suffix that Python 2 era numpy wrote and numpy still
    /// reads. `None` if it does not fit in `usize`.
    fn integer(&mut self) -> Result<Option<usize>, HeaderError> {
        let start = self.pos;
        let mut value = Some(0usize);
        while let Some(b @ b'0'..=b'9') = self.peek() {
            value = value.and_then(|v| v.checked_mul(10)).and_then(|v| v.checked_add(usize::from(b - b'0')));
            self.pos += 1;
        }
        let digits = &self.s[start..self.pos];
        if digits.is_empty() {
            return Err(self.err("'shape' entries must be non-negative integers"));
        }
        if digits.len() > 1 && digits[0] == b'0' {
            self.pos = start;
            return Err(self.err("leading zeros in a 'shape' entry"));
        }
        if self.peek() == Some(b'L') {
            self.pos += 1;
        }
        Ok(value)
    }
}

/// Encodes a v1.0 header for `dtype`/`shape`: the preamble and the dict,
/// padded with spaces and a final `'\n'` so that its length (which is the
/// data offset) is a multiple of [`ALIGN`] (64).
///
/// The dict is formatted exactly as numpy writes it:
/// `{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }` (1-d shape
/// `(5,)`, 0-d `()`).
///
/// # Panics
///
/// If the shape has so many dimensions (thousands) that the header would not
/// fit in [`MAX_HEADER_LEN`]; [`try_encode_header`] returns an error instead.
pub fn encode_header(dtype: DType, shape: &[usize]) -> Vec<u8> {
    match try_encode_header(dtype, shape) {
        Ok(header) => header,
        Err(e) => panic!("cannot encode a .npy header for shape {shape:?}: {e}"),
    }
}

/// Like [`encode_header`], but returns [`HeaderError::TooLong`] instead of
/// panicking when the header would exceed [`MAX_HEADER_LEN`].
pub fn try_encode_header(dtype: DType, shape: &[usize]) -> Result<Vec<u8>, HeaderError> {
    let dims = match shape {
        [] => String::new(),
        [d] => format!("{d},"),
        _ => shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let dict = format!("{{'descr': '{}', 'fortran_order': False, 'shape': ({dims}), }}", dtype.npy_descr());
    // +1 for the '\n' numpy always ends the header with.
    let unpadded = PREAMBLE_LEN + dict.len() + 1;
    let total = unpadded.div_ceil(ALIGN) * ALIGN;
    let header_len = total - PREAMBLE_LEN;
    let header_len_u16 = match u16::try_from(header_len) {
        Ok(n) if total <= MAX_HEADER_LEN => n,
        _ => return Err(HeaderError::TooLong { len: total }),
    };
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&header_len_u16.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    Ok(out)
}

/// Error about a file: always carries the path.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// Opening, reading, creating or writing failed, or the arguments were
    /// invalid (then `source` has kind [`io::ErrorKind::InvalidInput`]).
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The file's header is not an accepted `.npy` header.
    #[error("{} is not an accepted .npy file: {source}", .path.display())]
    Header {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with the header.
        source: HeaderError,
    },
    /// The file length differs from what its header implies.
    #[error(
        "{} is {actual} bytes long but its .npy header implies exactly {expected} bytes \
         (the file is truncated or has trailing data)",
        .path.display()
    )]
    Length {
        /// The file concerned.
        path: PathBuf,
        /// `data_offset + data_len` from the header.
        expected: u64,
        /// The file's actual length.
        actual: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> NpyError + '_ {
    move |source| NpyError::Io { path: path.to_path_buf(), source }
}

fn invalid_input(path: &Path, msg: String) -> NpyError {
    NpyError::Io { path: path.to_path_buf(), source: io::Error::new(io::ErrorKind::InvalidInput, msg) }
}

/// Reads into `buf` until it is full or the file ends; returns the count read.
/// Unlike `read_exact`, a short file is not an error here: the header parser
/// turns it into a precise [`HeaderError::Truncated`].
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Names a non-regular file type for the error message.
pub(crate) fn file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a fifo"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Opens `path`, reads and validates the header (reads at most
/// [`MAX_HEADER_LEN`] bytes: the 10-byte preamble first, to learn and check
/// the header length before reading more), and checks that the file length is
/// exactly `data_offset + data_len`. Refuses non-regular files (directories,
/// fifos, devices).
///
/// The returned file is open read-only with its cursor at `data_offset`.
pub fn read_header(path: &Path) -> Result<(File, NpyHeader), NpyError> {
    // O_NONBLOCK so that opening a fifo does not hang waiting for a writer;
    // the file type is checked right after, and the flag cleared again.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    if !meta.file_type().is_file() {
        return Err(invalid_input(path, format!("is {}, not a regular .npy file", file_kind(meta.file_type()))));
    }
    clear_nonblock(&file).map_err(io_err(path))?;

    let header_err = |source| NpyError::Header { path: path.to_path_buf(), source };
    let mut preamble = [0u8; PREAMBLE_LEN];
    let got = read_full(&mut file, &mut preamble).map_err(io_err(path))?;
    let header_len = parse_preamble(&preamble[..got]).map_err(header_err)?;
    // header_len <= MAX_HEADER_LEN here, so this allocation is bounded.
    let mut bytes = vec![0u8; header_len];
    bytes[..PREAMBLE_LEN].copy_from_slice(&preamble);
    let got = PREAMBLE_LEN + read_full(&mut file, &mut bytes[PREAMBLE_LEN..]).map_err(io_err(path))?;
    let header = parse_header(&bytes[..got]).map_err(header_err)?;

    let expected = header.file_len();
    let actual = meta.len();
    if actual != expected {
        return Err(NpyError::Length { path: path.to_path_buf(), expected, actual });
    }
    Ok((file, header))
}

fn clear_nonblock(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Checks the arguments of [`write`]/[`create`] and encodes the header, before
/// any file is created, so bad arguments leave nothing behind.
fn prepare(path: &Path, dtype: DType, shape: &[usize]) -> Result<(Vec<u8>, NpyHeader), NpyError> {
    let Some(data_len) = dtype.nbytes(shape) else {
        return Err(invalid_input(
            path,
            format!("a {dtype} array of shape {shape:?} has more bytes than fit in memory"),
        ));
    };
    let bytes =
        try_encode_header(dtype, shape).map_err(|e| invalid_input(path, format!("cannot encode the header: {e}")))?;
    let header = NpyHeader { dtype, shape: shape.to_vec(), data_offset: bytes.len() };
    if bytes.len().checked_add(data_len).is_none_or(|t| t > isize::MAX as usize) {
        return Err(invalid_input(
            path,
            format!("a {dtype} array of shape {shape:?} has more bytes than fit in memory"),
        ));
    }
    Ok((bytes, header))
}

/// Creates `path` exclusively: it must not exist (not even as a symlink, which
/// `O_EXCL` refuses too; `O_NOFOLLOW` says the same intent explicitly), mode
/// `0o600` because the arrays may be private data.
fn create_new(path: &Path, read: bool) -> Result<File, NpyError> {
    OpenOptions::new()
        .read(read)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path))
}

/// Removes a half-written file after a failure: since files are created with
/// `create_new`, leaving it would make a retry fail with "file exists", and a
/// reader could mistake it for a result. Best effort; the original error is
/// what gets reported.
fn discard(path: &Path, err: io::Error) -> NpyError {
    let _ = std::fs::remove_file(path);
    io_err(path)(err)
}

/// Writes `header` then `data` with vectored writes: usually one syscall.
fn write_two(file: &mut File, header: &[u8], data: &[u8]) -> io::Result<()> {
    crate::io::write_all_vectored(file, &mut [IoSlice::new(header), IoSlice::new(data)])
}

/// Writes a new `.npy` file holding `data` (little-endian, C order) as an
/// array of `dtype` and `shape`.
///
/// The file must not already exist; it is created with mode `0o600` and
/// `O_NOFOLLOW | O_CLOEXEC`. `data.len()` must equal `dtype.nbytes(shape)`,
/// else an [`NpyError::Io`] of kind [`io::ErrorKind::InvalidInput`] is
/// returned and no file is created. On a write error the partial file is
/// removed.
pub fn write(path: &Path, dtype: DType, shape: &[usize], data: &[u8]) -> Result<NpyHeader, NpyError> {
    let (bytes, header) = prepare(path, dtype, shape)?;
    if data.len() != header.data_len() {
        return Err(invalid_input(
            path,
            format!(
                "data is {} bytes but a {dtype} array of shape {shape:?} is {} bytes",
                data.len(),
                header.data_len()
            ),
        ));
    }
    let mut file = create_new(path, false)?;
    write_two(&mut file, &bytes, data).map_err(|e| discard(path, e))?;
    Ok(header)
}

/// Creates a new `.npy` file of the given dtype/shape with the header written
/// and the data zero-filled (via `set_len`, so it is sparse until written).
/// Same creation rules as [`write()`]. Returns the file, open read-write with
/// its cursor at `data_offset`, and the header; used for shared outputs that
/// workers fill through a memory map.
pub fn create(path: &Path, dtype: DType, shape: &[usize]) -> Result<(File, NpyHeader), NpyError> {
    let (bytes, header) = prepare(path, dtype, shape)?;
    let mut file = create_new(path, true)?;
    file.write_all(&bytes).map_err(|e| discard(path, e))?;
    file.set_len(header.file_len()).map_err(|e| discard(path, e))?;
    Ok((file, header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop
    /// (`tempfile` is not a dependency of this crate).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("procjob-npy-{}-{name}-{n}", std::process::id()));
            std::fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Frames a dict text as a v1.0 header (no padding or alignment added).
    fn frame(dict: &str) -> Vec<u8> {
        frame_bytes(dict.as_bytes())
    }

    fn frame_bytes(dict: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        v.extend_from_slice(dict);
        v
    }

    /// Frames a dict and pads it with spaces and '\n' to a 64-byte boundary.
    fn frame_aligned(dict: &str) -> Vec<u8> {
        let total = (PREAMBLE_LEN + dict.len() + 1).div_ceil(ALIGN) * ALIGN;
        let padded = format!("{dict:<width$}\n", width = total - PREAMBLE_LEN - 1);
        frame(&padded)
    }

    fn dict(descr: &str, fortran: &str, shape: &str) -> String {
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
    }

    #[test]
    fn encode_parse_round_trip() {
        let shapes: &[&[usize]] = &[&[], &[5], &[0], &[1, 1], &[0, 5], &[3, 4], &[2, 3, 4, 5], &[usize::MAX / 64]];
        for dtype in DType::ALL {
            for &shape in shapes {
                let bytes = encode_header(dtype, shape);
                assert_eq!(bytes.len() % ALIGN, 0, "{dtype} {shape:?}");
                assert_eq!(*bytes.last().unwrap(), b'\n');
                let h = parse_header(&bytes).unwrap();
                assert_eq!(h, NpyHeader { dtype, shape: shape.to_vec(), data_offset: bytes.len() });
                // Trailing data bytes after the header are ignored by the parser.
                let mut longer = bytes.clone();
                longer.extend_from_slice(&[0xff; 100]);
                assert_eq!(parse_header(&longer).unwrap(), h);
            }
        }
    }

    #[test]
    fn encode_matches_numpy_text() {
        let b = encode_header(DType::F64, &[3, 4]);
        assert_eq!(&b[..6], MAGIC);
        assert_eq!(&b[6..8], &[1, 0]);
        assert_eq!(usize::from(u16::from_le_bytes([b[8], b[9]])), b.len() - 10);
        let text = std::str::from_utf8(&b[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }  "));
        assert!(text.trim_end_matches('\n').bytes().skip(60).all(|c| c == b' '));
        let one = encode_header(DType::I64, &[5]);
        assert!(std::str::from_utf8(&one[10..])
            .unwrap()
            .starts_with("{'descr': '<i8', 'fortran_order': False, 'shape': (5,), }"));
        let zero = encode_header(DType::F32, &[]);
        assert!(std::str::from_utf8(&zero[10..])
            .unwrap()
            .starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (), }"));
        assert_eq!(zero.len(), 128, "numpy pads these to 128 too");
    }

    #[test]
    fn data_len_and_len() {
        let h = NpyHeader { dtype: DType::F32, shape: vec![7, 5], data_offset: 64 };
        assert_eq!(h.data_len(), 140);
        assert_eq!(h.len(), 35);
        assert_eq!(h.file_len(), 204);
        let scalar = NpyHeader { dtype: DType::I64, shape: vec![], data_offset: 64 };
        assert_eq!(scalar.data_len(), 8);
        assert!(!scalar.is_empty());
        let empty = NpyHeader { dtype: DType::F64, shape: vec![0, 3], data_offset: 64 };
        assert_eq!(empty.data_len(), 0);
        assert!(empty.is_empty());
    }

    #[test]
    fn parser_accepts_numpy_variations() {
        let cases: &[(&str, DType, &[usize])] = &[
            // Keys in any order, double quotes, no trailing comma, odd spacing.
            ("{'shape': (3, 4), 'fortran_order': False, 'descr': '<f4'}", DType::F32, &[3, 4]),
            ("{\"descr\": \"<i8\", \"fortran_order\": False, \"shape\": (2,)}", DType::I64, &[2]),
            ("{ 'descr' : '<f8' ,\t'fortran_order':False,'shape':( 3 , 4 , ) , }", DType::F64, &[3, 4]),
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (3L, 4L), }", DType::F64, &[3, 4]),
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", DType::F64, &[]),
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (0,), }", DType::F64, &[0]),
        ];
        for &(d, dtype, shape) in cases {
            let h = parse_header(&frame_aligned(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
            assert_eq!((h.dtype, h.shape.as_slice()), (dtype, shape), "{d}");
        }
        // Native '=' is little-endian on the hosts we build for.
        let native = parse_header(&frame_aligned(&dict("=f8", "False", "(1,)")));
        if cfg!(target_endian = "little") {
            assert_eq!(native.unwrap().dtype, DType::F64);
        } else {
            assert!(matches!(native, Err(HeaderError::NonNativeByteOrder { .. })));
        }
        // Old numpy aligned to 16, which is still aligned enough for us.
        let d = dict("<i8", "False", "(2,)");
        let pad = (PREAMBLE_LEN + d.len() + 1).div_ceil(16) * 16 - PREAMBLE_LEN - 1;
        let h = parse_header(&frame(&format!("{d:<pad$}\n"))).unwrap();
        assert_eq!(h.data_offset % 16, 0);
    }

    fn err(dict: &str) -> HeaderError {
        parse_header(&frame_aligned(dict)).unwrap_err()
    }

    fn malformed(dict: &str) {
        match err(dict) {
            HeaderError::Malformed(_) => {}
            e => panic!("{dict}: expected Malformed, got {e:?}"),
        }
    }

    #[test]
    fn preamble_errors() {
        let good = encode_header(DType::F64, &[3]);

        let mut bad = good.clone();
        bad[0] = b'P';
        assert_eq!(parse_header(&bad), Err(HeaderError::BadMagic));
        assert_eq!(parse_header(b"PK\x03\x04"), Err(HeaderError::BadMagic));

        for (major, minor) in [(2, 0), (3, 0), (1, 1), (0, 9)] {
            let mut v = good.clone();
            v[6] = major;
            v[7] = minor;
            let e = parse_header(&v).unwrap_err();
            assert_eq!(e, HeaderError::UnsupportedVersion { major, minor });
            assert!(e.to_string().contains("only .npy format 1.0 is accepted"), "{e}");
        }

        assert_eq!(parse_header(&good[..4]), Err(HeaderError::Truncated { needed: 10, got: 4 }));
        assert_eq!(parse_header(&good[..20]), Err(HeaderError::Truncated { needed: good.len(), got: 20 }));

        let mut long = good.clone();
        long[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(parse_header(&long), Err(HeaderError::TooLong { len: 10 + 65535 }));
    }

    #[test]
    fn dict_errors() {
        let mut bytes = frame_aligned(&dict("<f8", "False", "(3,)"));
        bytes[12] = 0xe9;
        assert_eq!(parse_header(&bytes), Err(HeaderError::NotAscii { offset: 12 }));

        for d in [
            "",
            " {'descr': '<f8', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,)",
            "{'descr': '<f8' 'fortran_order': False, 'shape': (3,)}",
            "{'descr' '<f8', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': <f8, 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f8\", 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f\\x38', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f8', 'fortran_order': false, 'shape': (3,)}",
            "{'descr': '<f8', 'fortran_order': 0, 'shape': (3,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': [3, 4]}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (-3,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3.0,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (03,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3 4)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,),,}",
            "{,}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'extra': 1}",
            "{'descr': '<f8', 'descr': '<f8', 'fortran_order': False, 'shape': (3,)}",
            "{'descr': '<f8', 'fortran_order': False, 'shape': (3,)} x",
            "{'descr': [('a', '<f8'), 'fortran_order': False, 'shape': (3,)}",
        ] {
            malformed(d);
        }
        let many = format!("({})", vec!["1"; MAX_NDIM + 1].join(", "));
        malformed(&dict("<f8", "False", &many));
        let max = format!("({})", vec!["1"; MAX_NDIM].join(", "));
        assert_eq!(parse_header(&frame_aligned(&dict("<f8", "False", &max))).unwrap().shape.len(), MAX_NDIM);

        assert_eq!(err("{}"), HeaderError::MissingKey("descr"));
        assert_eq!(err("{'descr': '<f8', 'shape': (3,)}"), HeaderError::MissingKey("fortran_order"));
        assert_eq!(err("{'descr': '<f8', 'fortran_order': False}"), HeaderError::MissingKey("shape"));
    }

    #[test]
    fn dtype_errors() {
        for descr in ["<f2", "|O", "<c32", "<U3", "|i8", "|f4", "<b2", "f8", "float64", "<M8[ns]", "<i16", "?"] {
            assert_eq!(err(&dict(descr, "False", "(3,)")), HeaderError::UnsupportedDtype { descr: descr.into() },);
        }
        let e = err(&dict("|O", "False", "(3,)"));
        assert_eq!(
            e.to_string(),
            "unsupported dtype '|O'; accepted are '|i1' (i8), '<i2' (i16), '<i4' (i32), '<i8' (i64), \
             '|u1' (u8), '<u2' (u16), '<u4' (u32), '<u8' (u64), '<f4' (f32), '<f8' (f64), '|b1' (bool), \
             '<c8' (c64), '<c16' (c128)"
        );
        // Every dtype in numpy's spellings: '<' (and '=' on a little-endian
        // host) for wider types; any order mark for one-byte types.
        let accepted: &[(&str, DType)] = &[
            ("|i1", DType::I8),
            ("<i1", DType::I8),
            (">i1", DType::I8),
            ("=i1", DType::I8),
            ("|u1", DType::U8),
            ("<u1", DType::U8),
            ("|b1", DType::Bool),
            ("<b1", DType::Bool),
            ("<i2", DType::I16),
            ("<i4", DType::I32),
            ("=i4", DType::I32),
            ("<i8", DType::I64),
            ("<u2", DType::U16),
            ("<u4", DType::U32),
            ("<u8", DType::U64),
            ("<f4", DType::F32),
            ("<f8", DType::F64),
            ("<c8", DType::C64),
            ("<c16", DType::C128),
        ];
        for &(descr, dtype) in accepted {
            let bytes = frame_aligned(&dict(descr, "False", "(3,)"));
            assert_eq!(parse_header(&bytes).map(|h| h.dtype), Ok(dtype), "{descr}");
        }
        // A structured dtype is a list, not a string; still reported as a dtype problem.
        assert_eq!(
            err("{'descr': [('a', '<f8'), ('b', '<i4')], 'fortran_order': False, 'shape': (3,), }"),
            HeaderError::UnsupportedDtype { descr: "[('a', '<f8'), ('b', '<i4')]".into() },
        );

        for descr in [">f8", ">i8", ">f4", ">i2", ">u4", ">c16", ">c8", ">u8"] {
            assert_eq!(err(&dict(descr, "False", "(3,)")), HeaderError::NonNativeByteOrder { descr: descr.into() },);
        }
        assert_eq!(
            err(&dict(">f8", "False", "(3,)")).to_string(),
            "big-endian data ('>f8') is not accepted; convert with arr.astype('<f8')"
        );
        // A big-endian type we would not accept either way is unsupported, not byte-order.
        assert!(matches!(err(&dict(">f2", "False", "(3,)")), HeaderError::UnsupportedDtype { .. }));

        let e = err(&dict("<f8", "True", "(3, 4)"));
        assert_eq!(e, HeaderError::FortranOrder);
        assert_eq!(e.to_string(), "Fortran-order arrays are not accepted; save np.ascontiguousarray(a)");
    }

    #[test]
    fn shape_overflow_and_alignment() {
        let huge = format!("({},)", u128::from(u64::MAX) + 1);
        let overflow = |shape: &str| HeaderError::ShapeOverflow { dtype: DType::I64, shape: shape.to_string() };
        assert_eq!(err(&dict("<i8", "False", &huge)), overflow(&huge));
        assert_eq!(
            err(&dict("<i8", "False", &huge)).to_string(),
            format!("a i64 array of shape {huge} has more bytes than this process can address")
        );
        let product = format!("({}, {})", u32::MAX, u32::MAX);
        assert_eq!(err(&dict("<i8", "False", &product)), overflow(&product));
        // Fits usize as a count but not as bytes.
        let bytes = format!("({},)", usize::MAX / 4);
        assert_eq!(err(&dict("<i8", "False", &bytes)), overflow(&bytes));
        // Fits as bytes but not in isize (slices are limited to isize::MAX bytes).
        let isize_over = format!("({},)", usize::MAX / 16);
        assert_eq!(err(&dict("<i8", "False", &isize_over)), overflow(&isize_over));
        // Malformed syntax takes precedence over the overflow it contains.
        malformed(&format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({}, -1)}}", u128::MAX));

        // Unpadded header: data offset 10 + len, generally not a multiple of 8.
        let d = dict("<f8", "False", "(3,)");
        let offset = PREAMBLE_LEN + d.len();
        assert_ne!(offset % 8, 0);
        let e = parse_header(&frame(&d)).unwrap_err();
        assert_eq!(e, HeaderError::MisalignedData { offset });
        assert!(e.to_string().contains("not a multiple of 8"), "{e}");
        // Padded to a multiple of 8 but not of 64: accepted.
        let pad = (offset + 1).div_ceil(8) * 8 - PREAMBLE_LEN - 1;
        let h = parse_header(&frame(&format!("{d:<pad$}\n"))).unwrap();
        assert_eq!(h.data_offset % 8, 0);
        assert_ne!(h.data_offset % 64, 0);
    }

    #[test]
    fn every_prefix_is_truncated() {
        for shape in [&[3usize, 4][..], &[], &[5]] {
            let good = encode_header(DType::F64, shape);
            for n in 0..good.len() {
                let needed = if n < PREAMBLE_LEN { PREAMBLE_LEN } else { good.len() };
                assert_eq!(parse_header(&good[..n]), Err(HeaderError::Truncated { needed, got: n }), "prefix {n}");
            }
            assert!(parse_header(&good).is_ok());
        }
    }

    #[test]
    fn every_cut_dict_is_malformed() {
        // A cut dict re-framed with a matching length: the parser sees an
        // incomplete dict and must say so, never panic.
        let full = dict("<f8", "False", "(3, 4)");
        for n in 0..full.len() {
            let e = parse_header(&frame(&full[..n])).unwrap_err();
            assert!(matches!(e, HeaderError::Malformed(_)), "cut at {n}: {e:?}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: mutate a valid header byte by byte and
        // with a small xorshift generator; every outcome must be Ok or Err.
        let good = encode_header(DType::F32, &[7, 5]);
        for i in 0..good.len() {
            for b in [0u8, b' ', b'\'', b'"', b'(', b')', b',', b'}', b'{', b'9', b'L', 0x80, 0xff] {
                let mut v = good.clone();
                v[i] = b;
                let _ = parse_header(&v);
            }
        }
        // Random token soups, so that many inputs get deep into the parser.
        let tokens: &[&[u8]] = &[
            b"{",
            b"}",
            b"(",
            b")",
            b"[",
            b"]",
            b"'descr'",
            b"'shape'",
            b"'fortran_order'",
            b"\"descr\"",
            b"'x'",
            b":",
            b",",
            b" ",
            b"\n",
            b"'<f8'",
            b"'>f4'",
            b"'|O'",
            b"True",
            b"False",
            b"3",
            b"0",
            b"05",
            b"-1",
            b"18446744073709551616",
            b"L",
            b"'",
            b"\"",
            b"\\",
            b"\xff",
            b"\x00",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..50_000 {
            let n = next() % 24;
            let mut dict = Vec::new();
            for _ in 0..n {
                dict.extend_from_slice(tokens[(next() % tokens.len() as u64) as usize]);
            }
            let _ = parse_header(&frame_bytes(&dict));
            // Also with a wrong declared length, shorter and longer than the text.
            let mut v = frame_bytes(&dict);
            v[8] = (next() % 256) as u8;
            let _ = parse_header(&v);
        }
    }

    fn sample(dtype: DType, n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| match dtype {
                DType::I64 => ((i as i64) * 1_000_003 - 17).to_le_bytes().to_vec(),
                DType::F64 => ((i as f64 - 7.0) / 3.0).to_le_bytes().to_vec(),
                DType::F32 => (((i as f64 - 7.0) / 3.0) as f32).to_le_bytes().to_vec(),
                DType::Bool => vec![(i % 3 == 0) as u8],
                // Any bytes are values of the other types.
                other => (0..other.size()).map(|b| (i * 31 + b * 7) as u8).collect(),
            })
            .collect()
    }

    #[test]
    fn write_then_read_header() {
        let dir = TempDir::new("roundtrip");
        let shapes: &[&[usize]] = &[&[], &[5], &[0, 5], &[1, 1], &[7, 5], &[2, 3, 4]];
        for dtype in DType::ALL {
            for (k, &shape) in shapes.iter().enumerate() {
                let path = dir.path(&format!("{dtype}-{k}.npy"));
                let n: usize = shape.iter().product();
                let data = sample(dtype, n);
                let written = write(&path, dtype, shape, &data).unwrap();
                let (mut file, header) = read_header(&path).unwrap();
                assert_eq!(header, written);
                assert_eq!(header.shape, shape);
                assert_eq!(header.data_offset % ALIGN, 0);
                let mut rest = Vec::new();
                file.read_to_end(&mut rest).unwrap();
                assert_eq!(rest, data, "cursor is left at data_offset");
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "group/other get no access");
            }
        }
    }

    #[test]
    fn write_refuses_wrong_data_length() {
        let dir = TempDir::new("wronglen");
        let path = dir.path("a.npy");
        let e = write(&path, DType::F64, &[3, 4], &[0u8; 95]).unwrap_err();
        match &e {
            NpyError::Io { source, .. } => assert_eq!(source.kind(), io::ErrorKind::InvalidInput),
            e => panic!("expected Io, got {e:?}"),
        }
        assert!(e.to_string().contains("95"), "{e}");
        assert!(!path.exists(), "nothing is created for bad arguments");
        let e = write(&path, DType::F64, &[usize::MAX, 2], &[]).unwrap_err();
        assert!(matches!(e, NpyError::Io { ref source, .. } if source.kind() == io::ErrorKind::InvalidInput));
        assert!(create(&path, DType::I64, &[usize::MAX / 8]).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn write_refuses_existing_and_symlink() {
        let dir = TempDir::new("exists");
        let path = dir.path("a.npy");
        write(&path, DType::I64, &[2], &sample(DType::I64, 2)).unwrap();
        let e = write(&path, DType::I64, &[2], &sample(DType::I64, 2)).unwrap_err();
        assert!(matches!(e, NpyError::Io { ref source, .. } if source.kind() == io::ErrorKind::AlreadyExists));
        assert!(e.to_string().contains("a.npy"), "{e}");
        assert!(create(&path, DType::I64, &[2]).is_err());

        // A symlink to an existing file and a dangling one: neither is followed.
        let target = dir.path("target.npy");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path("link.npy");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(write(&link, DType::F32, &[1], &[0; 4]).is_err());
        assert!(create(&link, DType::F32, &[1]).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");

        let missing = dir.path("missing.npy");
        let dangling = dir.path("dangling.npy");
        std::os::unix::fs::symlink(&missing, &dangling).unwrap();
        assert!(write(&dangling, DType::F32, &[1], &[0; 4]).is_err());
        assert!(!missing.exists(), "a dangling symlink's target is not created");
    }

    #[test]
    fn create_gives_exact_zero_filled_file() {
        let dir = TempDir::new("create");
        for (k, shape) in [&[7usize, 5][..], &[0, 3], &[], &[1000]].into_iter().enumerate() {
            let path = dir.path(&format!("c{k}.npy"));
            let (file, header) = create(&path, DType::F32, shape).unwrap();
            assert_eq!(file.metadata().unwrap().len(), (header.data_offset + header.data_len()) as u64);
            drop(file);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[..header.data_offset], encode_header(DType::F32, shape).as_slice());
            assert!(bytes[header.data_offset..].iter().all(|&b| b == 0));
            let (_, read) = read_header(&path).unwrap();
            assert_eq!(read, header);
        }
    }

    #[test]
    fn read_header_refuses_wrong_length() {
        let dir = TempDir::new("length");
        let path = dir.path("a.npy");
        write(&path, DType::F64, &[3], &sample(DType::F64, 3)).unwrap();
        let full = std::fs::read(&path).unwrap();

        let short = dir.path("short.npy");
        std::fs::write(&short, &full[..full.len() - 1]).unwrap();
        match read_header(&short).unwrap_err() {
            NpyError::Length { expected, actual, .. } => {
                assert_eq!((expected, actual), (full.len() as u64, full.len() as u64 - 1))
            }
            e => panic!("expected Length, got {e:?}"),
        }

        let long = dir.path("long.npy");
        let mut extra = full.clone();
        extra.push(0);
        std::fs::write(&long, &extra).unwrap();
        let e = read_header(&long).unwrap_err();
        assert!(matches!(e, NpyError::Length { expected: 152, actual: 153, .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("long.npy") && msg.contains("152") && msg.contains("153"), "{msg}");

        // Shorter than the header itself: a header error, not a length error.
        let stub = dir.path("stub.npy");
        std::fs::write(&stub, &full[..30]).unwrap();
        let e = read_header(&stub).unwrap_err();
        assert!(matches!(e, NpyError::Header { source: HeaderError::Truncated { needed: 128, got: 30 }, .. }), "{e:?}");
        assert!(e.to_string().contains("is not an accepted .npy file"), "{e}");

        // A preamble declaring an oversized header is refused before reading it.
        let big = dir.path("big.npy");
        let mut v = full[..10].to_vec();
        v[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
        std::fs::write(&big, &v).unwrap();
        assert!(matches!(read_header(&big).unwrap_err(), NpyError::Header { source: HeaderError::TooLong { .. }, .. }));

        let empty = dir.path("empty.npy");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            read_header(&empty).unwrap_err(),
            NpyError::Header { source: HeaderError::Truncated { needed: 10, got: 0 }, .. }
        ));
    }

    #[test]
    fn read_header_refuses_non_regular_files() {
        let dir = TempDir::new("nonregular");
        let e = read_header(&dir.0).unwrap_err();
        assert!(matches!(e, NpyError::Io { ref source, .. } if source.kind() == io::ErrorKind::InvalidInput));
        assert!(e.to_string().contains("is a directory"), "{e}");

        // Opening a fifo must not block waiting for a writer.
        let fifo = dir.path("fifo.npy");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_header(&fifo).unwrap_err();
        assert!(e.to_string().contains("is a fifo"), "{e}");

        let e = read_header(&dir.path("nope.npy")).unwrap_err();
        assert!(matches!(e, NpyError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound));
        assert!(e.to_string().contains("nope.npy"), "{e}");
    }

    #[test]
    fn read_header_clears_nonblock() {
        let dir = TempDir::new("flags");
        let path = dir.path("a.npy");
        write(&path, DType::I64, &[1], &[0; 8]).unwrap();
        let (file, _) = read_header(&path).unwrap();
        let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert!(!nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK));
    }
}
