"""Infinite-width kernel regression, and the finite network it describes, on digits.

One `stax` model gives three predictors on scikit-learn's bundled digits data
(8x8 images, 10 classes):

* NNGP: the posterior mean of the Gaussian process that the network's outputs
  at initialization converge to as the width goes to infinity;
* NTK: the infinite-width network trained to convergence by gradient descent
  on the mean squared error (the mean prediction of the ensemble);
* the finite network of the same architecture (width 512, NTK
  parameterization), trained by full-batch gradient descent (with momentum)
  on the same loss.

Run it with `bash scripts/setup.sh && .venv/bin/python examples/digits_kernel_regression.py`.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from torchntk import stax

N_CLASSES = 10


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


def kernel_regression(k_train_train: torch.Tensor, k_test_train: torch.Tensor,
                      y_train: torch.Tensor, diag_reg: float) -> torch.Tensor:
    """Posterior mean `K(x*, X) (K(X, X) + eps I)^-1 Y`, `eps = diag_reg * mean(diag K)`.

    The regularizer is relative to the kernel's scale, as in neural-tangents'
    `predict`, so one value of `diag_reg` suits kernels of any depth and W_std.
    """
    eps = diag_reg * k_train_train.diagonal().mean()
    eye = torch.eye(len(k_train_train), dtype=k_train_train.dtype)
    cholesky = torch.linalg.cholesky(k_train_train + eps * eye)
    return k_test_train @ torch.cholesky_solve(y_train, cholesky)


def accuracy(prediction: torch.Tensor, y: torch.Tensor) -> float:
    return (prediction.argmax(dim=1) == y.argmax(dim=1)).double().mean().item()


def mse(prediction: torch.Tensor, y: torch.Tensor) -> float:
    return 0.5 * (prediction - y).square().sum(dim=1).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=512, help='width of the finite network')
    parser.add_argument('--steps', type=int, default=500, help='gradient descent steps')
    parser.add_argument('--diag-reg', type=float, default=1e-4,
                        help='kernel regression regularizer, relative to mean(diag K)')
    parser.add_argument('--test-size', type=float, default=0.25, help='fraction held out')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    x_train, y_train, x_test, y_test = load_data(args.test_size, args.seed)
    model = stax.serial(
        stax.Dense(args.width, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(args.width, W_std=1.5, b_std=0.05), stax.Relu(),
        stax.Dense(N_CLASSES, W_std=1.5, b_std=0.05),
    )
    results = []

    start = time.perf_counter()
    kernels = {}
    pairs = {'train x train': (x_train, None), 'test x train': (x_test, x_train)}
    for name, (x1, x2) in tqdm(pairs.items(), desc='kernels'):
        kernels[name] = model.kernel_fn(x1, x2, get=('nngp', 'ntk'))
    kernel_seconds = time.perf_counter() - start
    for field in ('nngp', 'ntk'):
        start = time.perf_counter()
        prediction = kernel_regression(getattr(kernels['train x train'], field),
                                       getattr(kernels['test x train'], field),
                                       y_train, args.diag_reg)
        seconds = kernel_seconds + time.perf_counter() - start
        results.append((f'{field.upper()}, infinite width', prediction, seconds))

    # Gradient descent on 0.5 * mean squared error follows
    # df/dt = -(lr / N) * NTK (f - y); with heavy-ball momentum beta it is stable for
    # lr < 2 (1 + beta) N / max eig(NTK), so the infinite-width NTK picks the step.
    # The finite network trains in float32, as networks usually do.
    momentum = 0.9
    max_eigenvalue = torch.linalg.eigvalsh(kernels['train x train'].ntk)[-1].item()
    lr = 3.0 * len(x_train) / max_eigenvalue
    x_train, x_test, y_train = x_train.float(), x_test.float(), y_train.float()
    start = time.perf_counter()
    model.init_parameters(x_train.shape, generator=torch.Generator().manual_seed(args.seed),
                          dtype=x_train.dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    steps = tqdm(range(args.steps), desc='gradient descent')
    for _ in steps:
        optimizer.zero_grad()
        loss = 0.5 * (model(x_train) - y_train).square().sum(dim=1).mean()
        loss.backward()
        optimizer.step()
        steps.set_postfix(loss=f'{loss.item():.4f}', refresh=False)
    with torch.no_grad():
        prediction = model(x_test).double()
    results.append((f'finite, width {args.width}, {args.steps} GD steps', prediction,
                    time.perf_counter() - start))

    print(f'\ndigits: {len(x_train)} train, {len(x_test)} test images; '
          f'Dense-Relu-Dense-Relu-Dense, W_std=1.5, b_std=0.05\n')
    print(f"{'model':<36}{'test accuracy':>14}{'test MSE':>10}{'seconds':>9}")
    for name, prediction, seconds in results:
        print(f'{name:<36}{accuracy(prediction, y_test):>14.2%}'
              f'{mse(prediction, y_test):>10.4f}{seconds:>9.2f}')


if __name__ == '__main__':
    main()
