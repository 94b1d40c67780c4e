"""Reading py-spy's collapsed stacks into top functions (made-up samples)."""

from __future__ import annotations

from loadtests.profile import summarize_collapsed

COLLAPSED = "\n".join(
    [
        "thread (0x1): MainThread;main (app.py:1);serve (app.py:5);handle (app.py:9) 6",
        "thread (0x1): MainThread;main (app.py:1);serve (app.py:5);"
        "handle (app.py:9);sign (site-packages/pkcs11/types.py:40) 3",
        "thread (0x2): Thread-1 (worker);run (threading.py:10) 1",
    ]
)


def test_threads_self_and_inclusive_shares() -> None:
    out = summarize_collapsed(COLLAPSED, top=5)
    assert "samples: 10" in out
    assert "90.0%  MainThread" in out
    assert "busiest thread: MainThread" in out
    assert "66.7%  handle (app.py)" in out  # self, within the main thread: 6 of 9
    assert "33.3%  sign (pkcs11/types.py)" in out  # site-packages prefix dropped
    # main/serve/handle are on every main-thread sample, so not listed as inclusive there.
    main_part = out.split("all threads:")[0]
    inclusive = main_part.split("inclusive")[1]
    assert "serve (app.py)" not in inclusive


def test_no_samples() -> None:
    assert summarize_collapsed("") == "no samples"
