"""One tensor-parallel worker process (rank 1..N-1), started by engine/tensor_parallel.py as
`python -m tokenmill.engine.tp_worker SPEC`: join the groups, load this rank's share of the model
through the builder's own path (load_model + build_runner, as rank 0 does), wait for the others,
then run rank 0's plans until it broadcasts the end."""

from __future__ import annotations

import json
import sys

import torch

from tokenmill.config import resolve_kv_cache_dtype
from tokenmill.engine.builder import build_runner, load_model
from tokenmill.engine.tensor_parallel import CONNECTED, WorkerSpec
from tokenmill.errors import TensorParallelError
from tokenmill.executor.parallel import join, store_at


def main(argv: list[str]) -> int:
    spec = WorkerSpec(**json.loads(argv[0]))
    device = torch.device(spec.device)
    if device.type == "cpu":  # the ranks share this machine's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // spec.world))
    store = store_at(spec.port, spec.world)
    store.add(CONNECTED, 1)
    tp = join(store, spec.rank, spec.world, device)
    try:
        model = load_model(spec.source, spec.dtype, device, spec.quantization, spec.group_size)
        runner = build_runner(model, device, spec.num_blocks, spec.block_size, spec.max_model_len,
                              kv_cache_dtype=resolve_kv_cache_dtype(spec.kv_cache_dtype, model.dtype), tp=tp)
        tp.barrier()
        runner.serve()
    except TensorParallelError as e:  # rank 0 is gone or failed: nothing left to serve
        print(f"tokenmill: tensor-parallel worker rank {spec.rank} ends: {e}", file=sys.stderr)
        return 1
    finally:
        tp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
