"""Worker for the 2-process gloo test (spawned; must be importable by module name). Test code, not product."""
import os

import torch


def ddp_worker(rank: int, world_size: int, port: int, data_path: str, max_seq_len: int, chat_template,
               out_dir: str, result_dir: str, config_kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from _tiny_lm import ByteTokenizer, make_test_model
    from lladapter_ext import data as D
    from lladapter_ext import training as T

    info = T.init_distributed()
    assert (info.rank, info.world_size) == (rank, world_size) and dist.get_backend() == "gloo"
    try:
        dataset = D.load_dataset(data_path, ByteTokenizer(chat_template), max_seq_len)
        model = make_test_model()
        if rank == 1:  # a different start on rank 1: the trainer must broadcast rank 0's adapter
            with torch.no_grad():
                for p in model.adapter_parameters():
                    p.add_(1.0)
        result = T.finetune(model, dataset, T.TrainConfig(out_dir=out_dir, progress=False, **config_kwargs))
        torch.save({"adapter": model.adapter_state_dict(), "losses": result.losses},
                   os.path.join(result_dir, f"rank{rank}.pt"))
        T.finish_distributed()  # barrier first: a rank that leaves early can make gloo abort its peer
    finally:
        if dist.is_initialized():  # after an error: leave without the barrier (the peer may never reach it)
            dist.destroy_process_group()


def main(argv=None) -> None:
    """``python tests/_train_worker.py DATA OUT_DIR CONFIG_JSON``: a run for the kill test (sleeps after each step
    so the parent can kill it part-way)."""
    import argparse
    import json
    import sys
    import time

    sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    from _tiny_lm import ByteTokenizer, make_test_model
    from lladapter_ext import data as D
    from lladapter_ext import training as T

    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("out_dir")
    parser.add_argument("config_json")
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--sleep", type=float, default=0.2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dataset = D.load_dataset(args.data, ByteTokenizer("toy"), args.max_seq_len)
    T.finetune(make_test_model(), dataset, T.TrainConfig(out_dir=args.out_dir, **json.loads(args.config_json)),
               on_step=lambda record: time.sleep(args.sleep))


if __name__ == "__main__":
    main()
