//! The geometry of a window op (convolution, pooling), shared by the CPU and GPU engines.

use std::ops::Range;

/// Kernel, stride and `[top, bottom, left, right]` padding of a window op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal stride (both at least 1).
    pub stride: [usize; 2],
    /// `[top, bottom, left, right]`.
    pub pads: [usize; 4],
}

impl Window {
    /// The output height and width for an `h x w` input: `floor((h + top + bottom - kh) / sy)
    /// + 1`, the same for the width, and 0 where the kernel does not fit the padded input.
    ///
    /// # Panics
    /// If a stride is 0.
    pub fn output(&self, h: usize, w: usize) -> (usize, usize) {
        let [top, bottom, left, right] = self.pads;
        let size = |n: usize, k: usize, s: usize| {
            assert!(s > 0, "a window op's strides must be at least 1");
            if n < k {
                0
            } else {
                (n - k) / s + 1
            }
        };
        (
            size(h + top + bottom, self.kernel[0], self.stride[0]),
            size(w + left + right, self.kernel[1], self.stride[1]),
        )
    }

    /// The kernel rows and columns whose taps for output `(oy, ox)` lie inside an `h x w`
    /// image, and the input row and column of tap `(0, 0)` (which may lie outside, as may the
    /// taps outside the ranges).
    #[inline]
    pub fn taps_inside(
        &self,
        oy: usize,
        ox: usize,
        h: usize,
        w: usize,
    ) -> (Range<usize>, Range<usize>, isize, isize) {
        let inside = |o: usize, stride: usize, pad: usize, k: usize, n: usize| {
            let start = (o * stride) as isize - pad as isize;
            let lo = (-start).clamp(0, k as isize) as usize;
            let hi = (n as isize - start).clamp(lo as isize, k as isize) as usize;
            (lo..hi, start)
        };
        let (rows, y0) = inside(oy, self.stride[0], self.pads[0], self.kernel[0], h);
        let (cols, x0) = inside(ox, self.stride[1], self.pads[2], self.kernel[1], w);
        (rows, cols, y0, x0)
    }

    /// The input row and column of tap `(ky, kx)` for output `(oy, ox)`, if inside an `h x w`
    /// image.
    #[inline]
    pub fn source(
        &self,
        oy: usize,
        ox: usize,
        ky: usize,
        kx: usize,
        h: usize,
        w: usize,
    ) -> Option<(usize, usize)> {
        let y = (oy * self.stride[0] + ky).checked_sub(self.pads[0])?;
        let x = (ox * self.stride[1] + kx).checked_sub(self.pads[2])?;
        (y < h && x < w).then_some((y, x))
    }
}
