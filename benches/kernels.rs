//! Kernel throughput by size and dtype, one thread: `cargo bench --bench kernels`.
//!
//! Each iteration is one n×n · n×n product; divan reports the time per
//! product and, through the item counter, floating-point operations per
//! second (2·n³ per product): read "Mitem/s" as MFLOP/s (MOP/s for i64).
//! The `i64_wrapping` case uses values beyond the exact-in-f64 bound, so it
//! takes the integer kernel; `i64_exact` takes the f64 fast path.

use divan::counter::ItemsCount;
use divan::Bencher;
use procjob::matmul::Inputs;
use procjob::{Array, DType};

fn main() {
    procjob::init();
    divan::main();
}

const SIZES: [usize; 3] = [256, 512, 1024];

fn bench(bencher: Bencher, inputs: Inputs) {
    let n = inputs.a.shape()[0] as u64;
    bencher.counter(ItemsCount::new(2 * n * n * n)).bench(|| procjob::tasks::dot(&inputs.a, &inputs.b).unwrap());
}

#[divan::bench(args = SIZES, sample_count = 10)]
fn f64(bencher: Bencher, n: usize) {
    bench(bencher, Inputs::random(DType::F64, n, n, n, 1).expect("inputs fit in memory"));
}

#[divan::bench(args = SIZES, sample_count = 10)]
fn f32(bencher: Bencher, n: usize) {
    bench(bencher, Inputs::random(DType::F32, n, n, n, 1).expect("inputs fit in memory"));
}

#[divan::bench(args = SIZES, sample_count = 10)]
fn i64_exact(bencher: Bencher, n: usize) {
    bench(bencher, Inputs::random(DType::I64, n, n, n, 1).expect("inputs fit in memory"));
}

#[divan::bench(args = SIZES, sample_count = 10)]
fn i64_wrapping(bencher: Bencher, n: usize) {
    // Values near 2^40: products overflow the exact-in-f64 bound (and wrap).
    let Inputs { a, b } = Inputs::random(DType::I64, n, n, n, 1).expect("inputs fit in memory");
    let big = |x: &Array| {
        let v: Vec<i64> = x.as_slice::<i64>().unwrap().iter().map(|&e| (e + 1) << 40).collect();
        Array::from_vec(x.shape().to_vec(), v)
    };
    bench(bencher, Inputs { a: big(&a), b: big(&b) });
}
