//! Layers without parameters.

use candle_core::{Result, Tensor, D};

use crate::spec::{same_padding, BlurPool, Padding, Pool};

/// Pads the last two dimensions with `value`: `[top, bottom, left, right]`.
pub fn pad2d(xs: &Tensor, [top, bottom, left, right]: [usize; 4], value: f64) -> Result<Tensor> {
    if value == 0.0 {
        return xs
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right);
    }
    let (n, c, h, w) = xs.dims4()?;
    let full = |rows: usize, cols: usize| {
        Tensor::full(value, (n, c, rows, cols), xs.device())?.to_dtype(xs.dtype())
    };
    let mut rows = Vec::with_capacity(3);
    if top > 0 {
        rows.push(full(top, w)?);
    }
    rows.push(xs.clone());
    if bottom > 0 {
        rows.push(full(bottom, w)?);
    }
    let xs = Tensor::cat(&rows, 2)?;
    let h = h + top + bottom;
    let mut cols = Vec::with_capacity(3);
    if left > 0 {
        cols.push(full(h, left)?);
    }
    cols.push(xs);
    if right > 0 {
        cols.push(full(h, right)?);
    }
    Tensor::cat(&cols, 3)
}

/// The `[top, bottom, left, right]` padding TensorFlow applies for this window.
pub(crate) fn padding_amounts(
    xs: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: Padding,
) -> Result<[usize; 4]> {
    let (_, _, h, w) = xs.dims4()?;
    Ok(match padding {
        Padding::Valid => [0; 4],
        Padding::Same => {
            let (top, bottom) = same_padding(h, kernel[0], stride[0]);
            let (left, right) = same_padding(w, kernel[1], stride[1]);
            [top, bottom, left, right]
        }
    })
}

/// `max(x, 0)` with TensorFlow's gradient (0 at `x == 0`).
pub fn relu(xs: &Tensor) -> Result<Tensor> {
    xs.gt(0.0)?.where_cond(xs, &xs.zeros_like()?)
}

fn pool(xs: &Tensor, p: &Pool) -> Result<zoo_kernels::Pool2d> {
    Ok(zoo_kernels::Pool2d {
        size: p.size,
        stride: p.stride,
        padding: padding_amounts(xs, p.size, p.stride, p.padding)?,
    })
}

/// Max pooling; SAME padding never wins a window.
pub fn max_pool2d(xs: &Tensor, p: &Pool) -> Result<Tensor> {
    zoo_kernels::max_pool2d(xs, pool(xs, p)?)
}

/// Average pooling; a SAME window averages the pixels inside the image only.
pub fn avg_pool2d(xs: &Tensor, p: &Pool) -> Result<Tensor> {
    zoo_kernels::avg_pool2d(xs, pool(xs, p)?)
}

/// The fixed `[1,2,1] x [1,2,1] / 16` blur on every channel, SAME zero padding.
pub fn blur_pool(xs: &Tensor, blur: &BlurPool) -> Result<Tensor> {
    let c = xs.dim(1)?;
    let taps = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0].map(|t: f64| t / 16.0);
    let kernel = Tensor::new(&taps, xs.device())?
        .to_dtype(xs.dtype())?
        .reshape((1, 1, 3, 3))?
        .broadcast_as((c, 1, 3, 3))?;
    let stride = [blur.stride; 2];
    let pads = padding_amounts(xs, [3, 3], stride, Padding::Same)?;
    super::depthwise_conv2d(&pad2d(xs, pads, 0.0)?, &kernel, stride)
}

/// Mean over height and width, keeping them as `1 x 1`.
pub fn global_avg_pool(xs: &Tensor) -> Result<Tensor> {
    xs.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
}

/// `N x C x H x W -> N x (H*W*C) x 1 x 1`, in Keras' (H, W, C) order.
pub fn flatten(xs: &Tensor) -> Result<Tensor> {
    let n = xs.dim(0)?;
    let flat = xs.permute((0, 2, 3, 1))?.flatten_from(1)?;
    let features = flat.dim(1)?;
    flat.reshape((n, features, 1, 1))
}

/// Concatenates the input with itself along channels.
pub fn duplicate(xs: &Tensor) -> Result<Tensor> {
    Tensor::cat(&[xs, xs], 1)
}
