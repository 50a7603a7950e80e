//! The block-row matrix product as a task kind: `C[r0..r1, :] = A[r0..r1, :] · B`.
//!
//! Nothing here is special to the pool: [`MatmulBlock`] is a [`Task`] like
//! any user's. How A, B and C travel (inline, mapped, written in place) is
//! decided by how the coordinator builds the [`MatmulInput`]: owned arrays
//! are copied through the pipe, mapped ones travel as file references.

use serde::{Deserialize, Serialize};

use crate::array::Array;
use crate::dtype::{DType, Element};
use crate::kernels::{self, Kernel};
use crate::task::Task;

/// Computes one row block of `C = A · B`.
#[derive(Debug)]
pub struct MatmulBlock;

/// The input of one block.
#[derive(Debug, Serialize, Deserialize)]
pub struct MatmulInput {
    /// The rows of C this block computes, for messages. The first field:
    /// the failure tests' fault injection reads it from the front of the
    /// encoding, before the task runs.
    pub rows: (u64, u64),
    /// The block's rows of A (rows × k).
    pub a: Array,
    /// All of B: its `k × n` rows, or, with [`MatmulInput::b_panels`], B
    /// packed once for every block of the product (`k × n'`, see
    /// [`BPanels`]).
    pub b: Array,
    /// Where to write the block (rows × n, a read-write view of a shared
    /// output); `None` to send the block back.
    pub out: Option<Array>,
    /// How `b` is packed, when it is: then no block packs B again.
    pub b_panels: Option<BPanels>,
}

/// A `B` packed by [`kernels::pack_b`] for every block of one product:
/// an array `k × n'`, `n'` being `n` rounded up to whole panels of `width`
/// columns, in the order the GEMM reads it. A worker whose kernel reads
/// other panels (another CPU of a cluster) unpacks it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BPanels {
    /// Columns of B (of C).
    pub n: u64,
    /// Columns of a panel.
    pub width: u64,
}

/// The result of one block.
#[derive(Debug, Serialize, Deserialize)]
pub enum MatmulOutput {
    /// The block itself (rows × n).
    Block(Array),
    /// The block was written into the shared output; this many rows.
    Written {
        /// Rows written.
        rows: u64,
    },
}

impl Task for MatmulBlock {
    type Input = MatmulInput;
    type Output = MatmulOutput;
    type Error = String;

    fn name() -> &'static str {
        "matmul"
    }

    fn describe(input: &MatmulInput) -> Option<String> {
        Some(format!("rows {}..{}", input.rows.0, input.rows.1))
    }

    fn run(input: MatmulInput) -> Result<MatmulOutput, String> {
        let MatmulInput { a, b, out, b_panels, .. } = input;
        let (rows, k, n) = check_packed_shapes(&a, &b, b_panels)?;
        match out {
            None => {
                // Every element is written (`Kernel::matmul_block` overwrites).
                let mut c = Array::try_for_overwrite(a.dtype(), vec![rows, n])
                    .map_err(|e| format!("cannot make the output block: {e}"))?;
                multiply_into(&a, &b, b_panels, &mut c, rows, k, n)?;
                Ok(MatmulOutput::Block(c))
            }
            Some(mut c) => {
                if c.shape() != [rows, n] || c.dtype() != a.dtype() {
                    return Err(format!(
                        "output block is {} {:?}, expected {} [{rows}, {n}]",
                        c.dtype(),
                        c.shape(),
                        a.dtype()
                    ));
                }
                multiply_into(&a, &b, b_panels, &mut c, rows, k, n)?;
                Ok(MatmulOutput::Written { rows: rows as u64 })
            }
        }
    }
}

/// `np.dot` for two matrices: `(A, B) → A · B`. The building block of the
/// classic `parallel_dot` (see `examples/parallel_dot.rs`).
#[derive(Debug)]
pub struct Dot;

impl Task for Dot {
    type Input = (Array, Array);
    type Output = Array;
    type Error = String;

    fn name() -> &'static str {
        "dot"
    }

    fn run((a, b): (Array, Array)) -> Result<Array, String> {
        match a.dtype() {
            DType::I64 => multiply::<i64>(&a, &b),
            DType::F64 => multiply::<f64>(&a, &b),
            DType::F32 => multiply::<f32>(&a, &b),
            other => Err(not_a_matmul_dtype(other)),
        }
    }
}

/// The dtypes a matrix product is computed for: i64, f64 and f32 (the
/// kernels'); the other [`DType`]s travel and are stored, but are not
/// multiplied.
pub const MATMUL_DTYPES: [DType; 3] = [DType::I64, DType::F64, DType::F32];

/// Why a product of `dtype` is refused, naming what is accepted.
pub fn not_a_matmul_dtype(dtype: DType) -> String {
    format!("matmul multiplies i64, f64 or f32 matrices, not {dtype} (numpy '{}')", dtype.npy_descr())
}

/// Checks that A (rows × k) and B (k × n) fit; returns (rows, k, n).
pub fn check_shapes(a: &Array, b: &Array) -> Result<(usize, usize, usize), String> {
    if a.dtype() != b.dtype() {
        return Err(format!("A is {} but B is {}", a.dtype(), b.dtype()));
    }
    let (&[rows, k], &[kb, n]) = (a.shape(), b.shape()) else {
        return Err(format!("A and B must be 2-D, got shapes {:?} and {:?}", a.shape(), b.shape()));
    };
    if k != kb {
        return Err(format!("inner dimensions do not fit: A is {rows}×{k}, B is {kb}×{n}"));
    }
    Ok((rows, k, n))
}

/// [`check_shapes`] for a `B` that may come packed ([`BPanels`]): its
/// array must be `k × n'` for the `n` and panel width named.
fn check_packed_shapes(a: &Array, b: &Array, panels: Option<BPanels>) -> Result<(usize, usize, usize), String> {
    let (rows, k, wide) = check_shapes(a, b)?;
    let Some(BPanels { n, width }) = panels else { return Ok((rows, k, wide)) };
    let fits = usize::try_from(n)
        .ok()
        .zip(usize::try_from(width).ok())
        .filter(|&(n, width)| width > 0 && n.checked_next_multiple_of(width) == Some(wide));
    let Some((n, _)) = fits else {
        return Err(format!("B is packed as {k}×{wide}, which is not {n} columns in panels of {width}"));
    };
    Ok((rows, k, n))
}

/// `c = a · b`, `b` packed as `panels` says if they are given.
fn multiply_into(
    a: &Array,
    b: &Array,
    panels: Option<BPanels>,
    c: &mut Array,
    rows: usize,
    k: usize,
    n: usize,
) -> Result<(), String> {
    fn typed<T: Kernel>(
        a: &Array,
        b: &Array,
        panels: Option<BPanels>,
        c: &mut Array,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<(), String> {
        let a = a.as_slice::<T>().map_err(|e| e.to_string())?;
        let b = b.as_slice::<T>().map_err(|e| e.to_string())?;
        let c = c.as_mut_slice::<T>().map_err(|e| format!("cannot write the output block: {e}"))?;
        match panels {
            // The width was checked against B's shape, so it fits a usize.
            Some(p) => T::matmul_block_packed(a, b, c, rows, k, n, p.width as usize),
            None => kernels::matmul_block(a, b, c, rows, k, n),
        }
        Ok(())
    }
    match a.dtype() {
        DType::I64 => typed::<i64>(a, b, panels, c, rows, k, n),
        DType::F64 => typed::<f64>(a, b, panels, c, rows, k, n),
        DType::F32 => typed::<f32>(a, b, panels, c, rows, k, n),
        other => Err(not_a_matmul_dtype(other)),
    }
}

/// Multiplies in this process: the `seq` baseline and the reference.
pub fn multiply<T: Kernel + Element>(a: &Array, b: &Array) -> Result<Array, String> {
    let (rows, k, n) = check_shapes(a, b)?;
    // Fallible: the output's size comes from the inputs' shapes, not their
    // bytes (A[2²⁰, 0] · B[0, 2²⁰] is 8 TiB of C from 0 bytes of input).
    let mut c =
        Array::try_for_overwrite(T::DTYPE, vec![rows, n]).map_err(|e| format!("cannot make the product: {e}"))?;
    multiply_into(a, b, None, &mut c, rows, k, n)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `k × n` `B` and the same values packed in panels `width` wide.
    fn b_and_packed(k: usize, n: usize, width: usize) -> (Array, Array) {
        let values: Vec<f64> = (0..k * n).map(|i| (i % 97) as f64 - 48.0).collect();
        let wide = n.next_multiple_of(width);
        let mut packed = vec![0.0; k * wide];
        kernels::pack_b(&values, k, n, width, &mut packed);
        (Array::from_vec(vec![k, n], values), Array::from_vec(vec![k, wide], packed))
    }

    fn block(a: &Array, b: Array, b_panels: Option<BPanels>) -> Result<MatmulOutput, String> {
        MatmulBlock::run(MatmulInput { rows: (0, a.shape()[0] as u64), a: a.clone(), b, out: None, b_panels })
    }

    fn values(out: MatmulOutput) -> Vec<f64> {
        match out {
            MatmulOutput::Block(c) => c.as_slice::<f64>().unwrap().to_vec(),
            MatmulOutput::Written { .. } => panic!("no output was given"),
        }
    }

    #[test]
    fn a_packed_b_gives_the_product_of_its_rows() {
        let (m, k, n) = (5, 300, 13);
        let a = Array::from_vec(vec![m, k], (0..m * k).map(|i| (i % 13) as f64).collect::<Vec<f64>>());
        let (b, _) = b_and_packed(k, n, 8);
        let want = values(block(&a, b, None).unwrap());
        // This machine's panels, and others (another CPU's kernel).
        for width in <f64 as Kernel>::b_panel_width().into_iter().chain([4, 16, 64]) {
            let (_, packed) = b_and_packed(k, n, width);
            let got = values(block(&a, packed, Some(BPanels { n: n as u64, width: width as u64 })).unwrap());
            assert_eq!(got, want, "panels of {width}");
        }
    }

    #[test]
    fn a_packing_that_does_not_fit_b_is_refused() {
        let a = Array::from_vec(vec![2, 3], vec![1.0f64; 6]);
        let (_, packed) = b_and_packed(3, 13, 8); // 3 × 16
        for (n, width) in [(13, 0), (13, 5), (17, 8), (8, 8), (u64::MAX, 8), (13, u64::MAX)] {
            let err = block(&a, packed.clone(), Some(BPanels { n, width })).unwrap_err();
            assert!(err.contains("B is packed as 3×16, which is not"), "{n} in {width}: {err}");
        }
    }
}
