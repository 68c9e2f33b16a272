"""Hook: `--speculative-model sdsat --num-speculative-tokens K` on `vllm serve`.

Written against vLLM 0.32 (`EngineArgs.add_cli_args`, `engine/arg_utils.py`), which has only
`--speculative-config` and `--spec-model/--spec-tokens`. General plugins are loaded before the
parser is built, so the flags can be added here; they fill the existing `spec_model`/`spec_tokens`
fields, which `patches/speculative_config.py` turns into an SDSAT config.
"""
from vllm.engine.arg_utils import EngineArgs

_original = EngineArgs.add_cli_args


def add_cli_args(parser, *args, **kwargs):
    parser = _original(parser, *args, **kwargs)
    group = parser.add_argument_group("vllm-sdsat", "SDSAT self-drafting speculative decoding")
    group.add_argument("--speculative-model", dest="spec_model", default=None,
                       help="'sdsat' to draft with the target model's own adaptive tokens "
                            "(same as --speculative-config '{\"method\": \"sdsat\"}')")
    group.add_argument("--num-speculative-tokens", dest="spec_tokens", type=int, default=None,
                       help="drafts per step K (SDSAT: 1 exact draft + K-1 adaptive tokens)")
    return parser


def apply() -> None:
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
