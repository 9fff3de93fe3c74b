//! Strided f32 matrix multiply on the CPU through the `gemm` crate.

use gemm::Parallelism;

/// A row-major-or-not view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A dense row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a dense row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    /// Whether every element of a `rows x cols` view lies in `data` (overflow: it does not).
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || last_index(rows, cols, self.rs, self.cs).is_some_and(|i| i < self.data.len())
    }
}

/// `(rows - 1) * rs + (cols - 1) * cs`, or None where it overflows; rows and cols are positive.
fn last_index(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)
}

/// `dst[m x n] (row stride dst_rs) = (accumulate ? dst : 0) + scale * lhs[m x k] * rhs[k x n]`.
/// `parallel` lets gemm use the rayon pool; callers that already run in parallel pass false.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat<'_>,
    rhs: Mat<'_>,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Checked arithmetic: with wrapping strides the check could pass while gemm writes
    // outside `dst`. Rows of `dst` must not overlap (gemm's threads write them in parallel).
    assert!(
        last_index(m, n, dst_rs, 1).is_some_and(|i| i < dst.len())
            && (m == 1 || dst_rs >= n)
            && lhs.fits(m, k)
            && rhs.fits(k, n),
        "matmul operands out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let par = if parallel && m.saturating_mul(n).saturating_mul(k) >= 1 << 15 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: all three operands were bounds-checked above for the given strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2x3 times 3x2 product with a transposed rhs into rows of stride 3 (one padding column).
    #[test]
    fn strided_product() {
        let lhs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rhs_t = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5]; // rhs^T, 2x3
        let mut dst = [9.0f32; 6];
        let rhs = Mat::transposed(&rhs_t, 3);
        matmul(
            &mut dst,
            3,
            2,
            2,
            3,
            Mat::rows(&lhs, 3),
            rhs,
            false,
            1.0,
            false,
        );
        assert_eq!(dst, [-2.0, 5.5, 9.0, -2.0, 16.0, 9.0]);
    }

    /// An empty inner dimension is a sum of nothing: 0, or `dst` unchanged when accumulating;
    /// the padding column between rows is left alone either way.
    #[test]
    fn empty_inner_dimension() {
        for accumulate in [false, true] {
            let mut dst = [9.0f32; 6];
            let (lhs, rhs): ([f32; 0], [f32; 0]) = ([], []);
            let (l, r) = (Mat::rows(&lhs, 0), Mat::rows(&rhs, 2));
            matmul(&mut dst, 3, 2, 2, 0, l, r, accumulate, 1.0, false);
            let want = if accumulate {
                [9.0; 6]
            } else {
                [0.0, 0.0, 9.0, 0.0, 0.0, 9.0]
            };
            assert_eq!(dst, want, "accumulate {accumulate}");
        }
    }

    /// Operands of exactly the size a product needs are taken; one element short, each is
    /// refused before gemm reads or writes past it.
    #[test]
    fn operands_one_element_short_are_refused() {
        let (m, n, k) = (3, 4, 5);
        let run = |dst_len: usize, lhs_len: usize, rhs_len: usize| {
            let mut dst = vec![0.0f32; dst_len];
            let lhs = vec![1.0f32; lhs_len];
            let rhs = vec![1.0f32; rhs_len];
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let (l, r) = (Mat::rows(&lhs, k), Mat::rows(&rhs, n));
                matmul(&mut dst, n, m, n, k, l, r, false, 1.0, false);
                dst
            }))
        };
        assert_eq!(run(m * n, m * k, k * n).unwrap(), vec![k as f32; m * n]);
        for (dst, lhs, rhs) in [
            (m * n - 1, m * k, k * n),
            (m * n, m * k - 1, k * n),
            (m * n, m * k, k * n - 1),
        ] {
            let err = run(dst, lhs, rhs).expect_err("accepted a short operand");
            let msg = err.downcast_ref::<&str>().copied().unwrap_or_default();
            assert_eq!(
                msg, "matmul operands out of bounds",
                "dst {dst} lhs {lhs} rhs {rhs}"
            );
        }
    }

    /// No rows or no columns: nothing to compute, and nothing is read or written.
    #[test]
    fn empty_outputs_are_left_alone() {
        for (m, n) in [(0, 3), (3, 0)] {
            let mut dst = [7.0f32; 2];
            matmul(
                &mut dst,
                3,
                m,
                n,
                2,
                Mat::rows(&[], 2),
                Mat::rows(&[], 3),
                false,
                1.0,
                false,
            );
            assert_eq!(dst, [7.0; 2]);
        }
    }

    /// Strides whose offsets wrap around usize are refused before gemm can write outside `dst`.
    #[test]
    #[should_panic(expected = "matmul operands out of bounds")]
    fn wrapping_dst_stride_is_refused() {
        let mut dst = [0.0f32; 2];
        let (lhs, rhs) = ([1.0; 2], [1.0; 2]);
        matmul(
            &mut dst,
            usize::MAX,
            2,
            2,
            1,
            Mat::rows(&lhs, 1),
            Mat::rows(&rhs, 2),
            false,
            1.0,
            false,
        );
    }

    #[test]
    #[should_panic(expected = "matmul operands out of bounds")]
    fn wrapping_operand_stride_is_refused() {
        let mut dst = [0.0f32; 4];
        let lhs = Mat {
            data: &[1.0],
            rs: usize::MAX,
            cs: 1,
        };
        matmul(
            &mut dst,
            2,
            2,
            2,
            2,
            lhs,
            Mat::rows(&[1.0; 4], 2),
            false,
            1.0,
            false,
        );
    }
}
