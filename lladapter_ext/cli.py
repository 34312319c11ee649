"""The `lladapter` command line (also `python -m lladapter_ext`)."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    import torch

    import lladapter_ext

    info = lladapter_ext.build_info()
    print(f"lladapter_ext {lladapter_ext.__version__}")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA kernels     {'compiled in for archs ' + info['cuda_archs'] if info['with_cuda'] else 'not built'}")
    print(f"  GPU visible      {torch.cuda.is_available()}")
    print(f"  CPU kernels ISA  {info['cpu_isa']}")
    print(f"  debug build      {info['debug']}")
    if args.json:
        print(json.dumps(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lladapter", description="LLaMA-Adapter with fused kernels",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="build, kernels, model and parameter counts",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pi.add_argument("--json", action="store_true", help="also print the build info as JSON")
    pi.set_defaults(func=cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
