"""Infinite-width networks against a finite one, over training time, on digits.

One `stax` model gives, on scikit-learn's bundled digits data (8x8 images, 10
classes), trained by full-batch gradient descent on the mean squared error:

* NNGP: the mean of an infinite ensemble of infinitely wide networks whose
  readout layer alone is trained (at `t = ∞`: the posterior mean of the
  Gaussian process that the network's outputs at initialization converge to);
* NTK: the mean of an infinite ensemble of infinitely wide networks with all
  layers trained (`torchntk.predict.gradient_descent_mse` from zero outputs;
  `gradient_descent_mse_ensemble` gives the same mean and the covariance);
* NTK from the same start: one infinitely wide network started from the
  outputs of the finite network below at initialization
  (`torchntk.predict.gradient_descent_mse`);
* the finite network of the same architecture (width 512, NTK
  parameterization), trained by gradient descent (`torch.optim.SGD`) with the
  same learning rate and loss.

It prints train and test accuracy against the training time `t` (in steps of
gradient descent) and saves a plot of these learning curves to
`examples/output/digits_learning_curves.png` when matplotlib is installed.

Last, the convolutional NTK of a Myrtle-5-style CNN (Shankar et al. 2020,
arXiv:2003.02237) on the 8x8 images themselves, beside the fully connected NTK,
both trained on the same subset (the CNN kernel keeps the covariance of every
pair of positions: 4096 numbers per pair of images).

Run it with `bash scripts/setup.sh && .venv/bin/python examples/digits_kernel_regression.py`.
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import torchntk
from torchntk import predict, stax

N_CLASSES = 10
DEFAULT_PLOT = pathlib.Path(__file__).parent / 'output' / 'digits_learning_curves.png'
logger = logging.getLogger('digits')


def load_data(test_size: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Digits as float64 `(N, 64)` inputs and centered one-hot `(N, 10)` targets.

    Each image is standardized on its own (mean 0, variance 1 over its 64
    pixels), so every input has the same norm and no statistic leaks from the
    test set. Targets are one-hot minus 1/10, so they average to zero over the
    classes, as the outputs of a network at initialization do.
    """
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, keepdim=True)
    labels = torch.tensor(digits.target)
    y = F.one_hot(labels, N_CLASSES).to(torch.float64) - 1.0 / N_CLASSES
    train, test = train_test_split(torch.arange(len(x)), test_size=test_size,
                                   random_state=seed, stratify=digits.target)
    return x[train], y[train], x[test], y[test]


def accuracy(prediction: torch.Tensor, y: torch.Tensor) -> float:
    return (prediction.argmax(dim=-1) == y.argmax(dim=-1)).double().mean(dim=-1).tolist()


def mse(prediction: torch.Tensor, y: torch.Tensor) -> float:
    """Squared error summed over classes, averaged over examples (halved)."""
    return (0.5 * (prediction - y).square().sum(dim=-1).mean(dim=-1)).tolist()


TABLE_TIMES = (0, 1, 3, 10, 30, 100, 300, 1000, 10 ** 4, 10 ** 5, math.inf)


def checkpoints(steps: int) -> list[int]:
    """The steps at which the finite network is evaluated: log-spaced, and the table's."""
    grid = {round(10 ** (e * math.log10(steps) / 24)) for e in range(25)}
    return sorted(grid | {0, steps} | {t for t in TABLE_TIMES if t <= steps})


def train_finite(model: stax.Layer, x_train: torch.Tensor, y_train: torch.Tensor,
                 x_test: torch.Tensor, learning_rate: float, steps: int,
                 seed: int) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], float]:
    """Full-batch gradient descent on `0.5 · mean((f - y)²)`, in float32 as networks
    usually train; outputs on train and test at `checkpoints(steps)`, and seconds."""
    x_train, y_train, x_test = x_train.float(), y_train.float(), x_test.float()
    start = time.perf_counter()
    model.init_parameters(x_train.shape, generator=torch.Generator().manual_seed(seed),
                          dtype=x_train.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    wanted, outputs = set(checkpoints(steps)), {}
    progress = tqdm(range(steps + 1), desc='finite network, gradient descent')
    for step in progress:
        if step in wanted:
            with torch.no_grad():
                outputs[step] = (model(x_train).double(), model(x_test).double())
        if step == steps:
            break
        optimizer.zero_grad()
        loss = 0.5 * (model(x_train) - y_train).square().mean()
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f'{loss.item():.4f}', refresh=False)
    return outputs, time.perf_counter() - start


def plot(path: pathlib.Path, times: torch.Tensor, curves: dict[str, dict[str, list[float]]],
         finite_steps: list[int], finite: dict[str, list[float]], width: int) -> None:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib, or "
                       "bash scripts/setup.sh, which installs the demo extras)")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    shown = times > 0   # a log axis: t = 0 is in the printed table
    styles = {'NNGP': ('tab:blue', '-'), 'NTK': ('tab:orange', '-'),
              'NTK, same start': ('tab:green', '--')}
    steps = torch.tensor(finite_steps)
    finite_shown = steps > 0
    for ax, metric, title in ((axes[0], 'accuracy', 'accuracy'), (axes[1], 'mse', 'squared error')):
        for name, (color, line) in styles.items():
            for split, alpha in (('train', 0.45), ('test', 1.0)):
                values = torch.tensor(curves[name][f'{split} {metric}'])
                ax.plot(times[shown], values[shown], line, color=color, alpha=alpha,
                        label=f'{name} (infinite), {split}')
        for split, marker in (('train', 'o'), ('test', 's')):
            values = torch.tensor(finite[f'{split} {metric}'])
            ax.plot(steps[finite_shown], values[finite_shown], marker, color='black',
                    markersize=4, fillstyle='none' if split == 'train' else 'full',
                    label=f'finite, width {width}, {split}')
        ax.set_xscale('log')
        ax.set_xlabel('training time t (steps of gradient descent)')
        ax.set_title(f'digits: {title}')
        ax.grid(alpha=0.3)
    axes[1].set_yscale('log')
    axes[1].set_ylim(bottom=1e-4)
    axes[0].legend(fontsize=7, loc='lower right')
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    logger.info("learning curves saved to %s", path)


def myrtle5(width: int = 64) -> stax.Serial:
    """Myrtle-5 (Shankar et al. 2020) for 8x8 inputs: two 2x2 poolings instead of three."""
    def conv() -> stax.Conv:
        return stax.Conv(width, (3, 3), padding='SAME', W_std=math.sqrt(2), b_std=0.)
    return stax.serial(conv(), stax.Relu(), conv(), stax.Relu(), stax.AvgPool((2, 2), (2, 2)),
                       conv(), stax.Relu(), stax.AvgPool((2, 2), (2, 2)), conv(), stax.Relu(),
                       stax.GlobalAvgPool(), stax.Dense(N_CLASSES, W_std=1., b_std=0.))


def compare_with_cnn(fc_model: stax.Layer, x_train: torch.Tensor, y_train: torch.Tensor,
                     x_test: torch.Tensor, y_test: torch.Tensor, n: int,
                     diag_reg: float) -> None:
    """Test accuracy at t = inf of the CNN's and the fully connected NTK on `n` train
    and `n` test images (the CNN kernel in float32, its solve in float64)."""
    x_train, y_train, x_test, y_test = x_train[:n], y_train[:n], x_test[:n], y_test[:n]
    print(f'NTK regression (t = inf) on the first {n} train and {n} test images:')
    for name, model, inputs in (
            ('fully connected, 3 layers', fc_model, lambda x: x),
            ('Myrtle-5-style CNN, 8x8 images', myrtle5(), lambda x: x.reshape(-1, 1, 8, 8).float())):
        start = time.perf_counter()
        # In 40 x 40 tiles (bounded memory, a progress bar); x2=None computes
        # only the tiles on and above the diagonal.
        ntk_fn = torchntk.batch(model.kernel_fn, batch_size=40)
        k_train_train = ntk_fn(inputs(x_train), None, get='ntk').double()
        # A float32 kernel is symmetric to float32 rounding only, and gp_inference
        # refuses a float64 matrix that is not symmetric to float64 rounding.
        k_train_train = 0.5 * (k_train_train + k_train_train.T)
        k_test_train = ntk_fn(inputs(x_test), inputs(x_train), get='ntk').double()
        prediction = predict.gp_inference(k_train_train, y_train, diag_reg=diag_reg)(
            'ntk', k_test_train)
        print(f'  {name:<34}{accuracy(prediction, y_test):>8.2%}'
              f'{time.perf_counter() - start:>8.1f} s')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=512, help='width of the finite network')
    parser.add_argument('--steps', type=int, default=200,
                        help='gradient descent steps of the finite network')
    parser.add_argument('--lr-fraction', type=float, default=0.75,
                        help='learning rate as a fraction of predict.max_learning_rate')
    parser.add_argument('--diag-reg', type=float, default=1e-4,
                        help='kernel regularizer, relative to mean(diag K)')
    parser.add_argument('--test-size', type=float, default=0.25, help='fraction held out')
    parser.add_argument('--plot', type=pathlib.Path, default=DEFAULT_PLOT,
                        help='where to save the learning curves (needs matplotlib)')
    parser.add_argument('--cnn-images', type=int, default=200,
                        help='train and test images for the CNN kernel comparison (0: skip it)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')

    x_train, y_train, x_test, y_test = load_data(args.test_size, args.seed)
    model = stax.serial(
        stax.Dense(args.width, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(args.width, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(N_CLASSES, W_std=1.5, b_std=0.05),
    )

    start = time.perf_counter()
    k_train_train = model.kernel_fn(x_train, None, get=('nngp', 'ntk'))
    k_test_train = model.kernel_fn(x_test, x_train, get=('nngp', 'ntk'))
    # t = inf: GP inference, one Cholesky solve per kernel.
    at_infinity = predict.gp_inference(k_train_train, y_train, diag_reg=args.diag_reg)(
        ('nngp', 'ntk'), k_test_train)
    infinite_seconds = time.perf_counter() - start

    # Gradient descent on 0.5 * mean((f - y)^2) over all N * 10 outputs follows
    # df/dt = -(lr / (N * 10)) NTK (f - y): stable below max_learning_rate.
    learning_rate = args.lr_fraction * predict.max_learning_rate(k_train_train.ntk,
                                                                 y_train.numel())
    finite_steps = checkpoints(args.steps)
    finite_outputs, finite_seconds = train_finite(model, x_train, y_train, x_test, learning_rate,
                                                  args.steps, args.seed)

    # Any times t from one cached eigendecomposition per kernel. Started from f_0 = 0 this
    # is the mean of the infinite ensemble (predict.gradient_descent_mse_ensemble also
    # gives its covariance); started from the finite network's f_0, one infinite network.
    finite_times = (set(finite_steps) | {t for t in TABLE_TIMES if math.isfinite(t)}
                    | {10 ** (e / 12) for e in range(61)})
    times = torch.tensor(sorted(finite_times) + [math.inf], dtype=torch.float64)
    flows = {g: predict.gradient_descent_mse(getattr(k_train_train, g), y_train, learning_rate,
                                             diag_reg=args.diag_reg) for g in ('nngp', 'ntk')}
    predictions = {
        'NNGP': flows['nngp'](times, 0., 0., k_test_train.nngp),
        'NTK': flows['ntk'](times, 0., 0., k_test_train.ntk),
        'NTK, same start': flows['ntk'](times, finite_outputs[0][0], finite_outputs[0][1],
                                        k_test_train.ntk),
    }

    curves = {}
    for name, (train, test) in predictions.items():
        curves[name] = {'train accuracy': accuracy(train, y_train),
                        'test accuracy': accuracy(test, y_test),
                        'train mse': mse(train, y_train), 'test mse': mse(test, y_test)}
    finite = {'train accuracy': [accuracy(finite_outputs[s][0], y_train) for s in finite_steps],
              'test accuracy': [accuracy(finite_outputs[s][1], y_test) for s in finite_steps],
              'train mse': [mse(finite_outputs[s][0], y_train) for s in finite_steps],
              'test mse': [mse(finite_outputs[s][1], y_test) for s in finite_steps]}

    print(f'\ndigits: {len(x_train)} train, {len(x_test)} test images; '
          f'Dense-Relu-Dense-Relu-Dense, W_std=1.5, b_std=0.05; full-batch gradient descent '
          f'on the MSE, learning rate {learning_rate:.4g} ({args.lr_fraction} of the maximum)\n')
    print(f"{'model':<36}{'test accuracy':>14}{'test MSE':>10}{'seconds':>9}")
    results = [('NNGP, infinite width, t = inf', at_infinity.nngp, infinite_seconds),
               ('NTK, infinite width, t = inf', at_infinity.ntk, infinite_seconds),
               (f'finite, width {args.width}, {args.steps} GD steps',
                finite_outputs[args.steps][1], finite_seconds)]
    for name, prediction, seconds in results:
        print(f'{name:<36}{accuracy(prediction, y_test):>14.2%}'
              f'{mse(prediction, y_test):>10.4f}{seconds:>9.2f}')

    print('\naccuracy (train / test) after t steps; infinite width from the ensemble mean '
          "(NNGP: readout layer trained), 'same start' from the finite network's initial outputs")
    header = ['t', 'NNGP', 'NTK', 'NTK, same start', f'finite, width {args.width}']
    print(f'{header[0]:>8}' + ''.join(f'{h:>20}' for h in header[1:]))
    for t in sorted(set(TABLE_TIMES) | {args.steps}):
        i = times.tolist().index(t)
        cells = [f"{curves[name]['train accuracy'][i]:>9.1%} / {curves[name]['test accuracy'][i]:<6.1%}"
                 for name in ('NNGP', 'NTK', 'NTK, same start')]
        if t in finite_steps:
            j = finite_steps.index(t)
            cells.append(f"{finite['train accuracy'][j]:>9.1%} / {finite['test accuracy'][j]:<6.1%}")
        else:
            cells.append(f"{'':>20}")
        print(f"{'inf' if math.isinf(t) else int(t):>8}" + ''.join(f'{c:>20}' for c in cells))
    print()
    plot(args.plot, times, curves, finite_steps, finite, args.width)
    if args.cnn_images:
        compare_with_cnn(model, x_train, y_train, x_test, y_test, args.cnn_images, args.diag_reg)


if __name__ == '__main__':
    main()
