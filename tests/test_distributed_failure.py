"""torchntk.batch over torch.distributed: an error on one rank reaches every rank
within seconds, with that rank's message, while the failed process stays alive
(gloo would otherwise wait 30 minutes in the next collective)."""

import pathlib
import time

import pytest
import torch
import torch.multiprocessing as mp

import torchntk as nt
from torchntk import stax

from tests.strategies import gaussian

WORLD_SIZE = 2
DEADLINE_S = 20


def _worker(rank: int, failing_rank: int, where: str, directory: pathlib.Path) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{directory / "rendezvous"}', rank=rank,
                            world_size=WORLD_SIZE)
    model = stax.serial(stax.Dense(4), stax.Relu(), stax.Dense(1))

    def kernel_fn(x1, x2=None, get=None):
        is_probe = x1.shape[0] == 1  # batch first calls kernel_fn on one example
        if dist.get_rank() == failing_rank and is_probe == (where == 'probe'):
            raise ValueError(f'the {where} broke on rank {failing_rank}')
        return model.kernel_fn(x1, x2, get)

    start = time.monotonic()
    try:
        nt.batch(kernel_fn, 2, progress=False)(gaussian(6, 3, seed=41), None, 'nngp')
        outcome = 'returned'
    except Exception as error:
        outcome = f'{type(error).__name__}: {error}'
    (directory / f'rank{rank}.txt').write_text(f'{time.monotonic() - start}\n{outcome}')
    # The failed rank stays in the group until every rank has an outcome.
    while not all((directory / f'rank{r}.txt').exists() for r in range(WORLD_SIZE)):
        time.sleep(0.05)
    dist.destroy_process_group()


@pytest.mark.parametrize('failing_rank, where', [(1, 'tile'), (0, 'tile'), (1, 'probe')])
def test_an_error_on_one_rank_is_raised_on_every_rank_with_its_message(tmp_path, failing_rank,
                                                                       where):
    # fork: the children start with torch already imported (seconds saved on two cores).
    processes = mp.start_processes(_worker, args=(failing_rank, where, tmp_path),
                                   nprocs=WORLD_SIZE, start_method='fork', join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not processes.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            hung = [r for r in range(WORLD_SIZE) if not (tmp_path / f'rank{r}.txt').exists()]
            pytest.fail(f'ranks {hung} did not raise within {DEADLINE_S} s')
    message = f'ValueError: the {where} broke on rank {failing_rank}'
    for rank in range(WORLD_SIZE):
        seconds, outcome = (tmp_path / f'rank{rank}.txt').read_text().split('\n', 1)
        assert float(seconds) < 10, (rank, seconds)
        if rank == failing_rank:
            assert outcome == message
        else:
            assert outcome == f'RuntimeError: batch: rank {failing_rank} of 2 failed: {message}'
