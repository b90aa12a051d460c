"""Worker flags out of range end the worker at startup with a message naming the flag."""

import pytest

from services import cli
from services.worker import check_args


def _args(*flags: str):
    argv = ["worker", "--engine", "sim", *flags]
    return cli.build_parser(argv).parse_args(argv)


def test_the_defaults_pass():
    check_args(_args())
    check_args(_args("--kv-events-interval", "0", "--sim-itl", "0", "--sim-eos-probability", "1"))


@pytest.mark.parametrize("flags, message", [
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["--block-size", "-16"], "--block-size must be >= 1, got -16"),
    (["--kv-blocks", "0"], "--kv-blocks must be >= 1, got 0"),
    (["--lease-ttl", "0"], "--lease-ttl must be >= 1, got 0"),
    (["--drain-seconds", "-1"], "--drain-seconds must be >= 0.0, got -1.0"),
    (["--kv-events-heartbeat", "0"], "--kv-events-heartbeat must be > 0.0, got 0.0"),
    (["--kv-events-interval", "nan"], "--kv-events-interval must be >= 0.0, got nan"),
    (["--sim-itl", "-0.001"], "--sim-itl must be >= 0.0, got -0.001"),
    (["--sim-prefill-per-token", "inf"], "--sim-prefill-per-token must be >= 0.0, got inf"),
    (["--sim-num-blocks", "0"], "--sim-num-blocks must be >= 1, got 0"),
    (["--sim-eos-probability", "1.5"], "--sim-eos-probability must be <= 1, got 1.5"),
])
def test_out_of_range_flags_are_named(flags, message):
    with pytest.raises(SystemExit) as exc:
        check_args(_args(*flags))
    assert str(exc.value) == message
