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
    /// All of B (k × n).
    pub b: Array,
    /// Where to write the block (rows × n, a read-write view of a shared
    /// output); `None` to send the block back.
    pub out: Option<Array>,
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
        let MatmulInput { a, b, out, .. } = input;
        let (rows, k, n) = check_shapes(&a, &b)?;
        match out {
            None => {
                // Every element is written (`Kernel::matmul_block` overwrites).
                let mut c = Array::try_for_overwrite(a.dtype(), vec![rows, n])
                    .map_err(|e| format!("cannot make the output block: {e}"))?;
                multiply_into(&a, &b, &mut c, rows, k, n)?;
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
                multiply_into(&a, &b, &mut c, rows, k, n)?;
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

fn multiply_into(a: &Array, b: &Array, c: &mut Array, rows: usize, k: usize, n: usize) -> Result<(), String> {
    fn typed<T: Kernel>(a: &Array, b: &Array, c: &mut Array, rows: usize, k: usize, n: usize) -> Result<(), String> {
        let a = a.as_slice::<T>().map_err(|e| e.to_string())?;
        let b = b.as_slice::<T>().map_err(|e| e.to_string())?;
        let c = c.as_mut_slice::<T>().map_err(|e| format!("cannot write the output block: {e}"))?;
        kernels::matmul_block(a, b, c, rows, k, n);
        Ok(())
    }
    match a.dtype() {
        DType::I64 => typed::<i64>(a, b, c, rows, k, n),
        DType::F64 => typed::<f64>(a, b, c, rows, k, n),
        DType::F32 => typed::<f32>(a, b, c, rows, k, n),
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
    multiply_into(a, b, &mut c, rows, k, n)?;
    Ok(c)
}
