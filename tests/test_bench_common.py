"""benchmarks/_common.py's paired rounds (bench_e2e --paired-steps): the children stay alive, are asked in turn with
the order reversed every other round, and a child that fails raises with its stderr."""
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from _common import paired_timings  # noqa: E402

CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {bench!r})
    from _common import serve_timed_calls
    name, log = sys.argv[2], sys.argv[3]
    if name == "broken":
        raise SystemExit("broken: cannot build its model")
    print("a library's own line on stdout")  # not part of the protocol
    calls = [0]
    def call():
        calls[0] += 1
        if name == "dies" and calls[0] == 2:
            raise RuntimeError("died on its second call")
        if name == "hangs" and calls[0] == 2:
            print("hangs on its second call", file=sys.stderr, flush=True)
            import time
            time.sleep(600)
        with open(log, "a") as f:
            f.write(f"{{name}}:{{os.getpid()}}\\n")
        return 0.25 * calls[0]
    serve_timed_calls(call)
""")


@pytest.fixture
def child(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench=os.path.dirname(sys.modules["_common"].__file__)))
    return str(script), str(tmp_path / "calls.log")


def test_children_answer_in_turn_the_order_reversed_every_other_round(child):
    script, log = child
    times = paired_timings(script, ["a", "b"], [log], rounds=3)
    assert times == {"a": [0.25, 0.5, 0.75], "b": [0.25, 0.5, 0.75]}  # each child's own count: one process each
    calls = [line.split(":") for line in open(log).read().split()]
    assert [name for name, _ in calls] == ["a", "b", "b", "a", "a", "b"]
    pids = {name: {pid for n, pid in calls if n == name} for name in ("a", "b")}
    assert len(pids["a"]) == len(pids["b"]) == 1 and pids["a"] != pids["b"]  # alive across rounds, not restarted


@pytest.mark.parametrize("bad, message", [("broken", "broken: cannot build its model"),
                                          ("dies", "died on its second call")])
def test_a_failing_child_raises_with_its_stderr(child, bad, message):
    script, log = child
    with pytest.raises(RuntimeError, match=f"variant '{bad}' failed") as e:
        paired_timings(script, ["a", bad], [log], rounds=3)
    assert message in str(e.value)


def test_a_child_that_stops_answering_is_killed_and_raises(child):
    script, log = child
    # a call gets 5 s, the start (importing torch, on a loaded 2-core CI machine: more than 3 s) 300 s
    with pytest.raises(RuntimeError, match="variant 'hangs' failed .*killed after 5 s without an answer") as e:
        paired_timings(script, ["a", "hangs"], [log], rounds=3, timeout_s=5, ready_timeout_s=300)
    assert "hangs on its second call" in str(e.value)
