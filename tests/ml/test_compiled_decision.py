"""The compile decision of stage one (``mirip.ml.compiled``), unit by unit: whether a run compiles, why, and the
summary line. Expected values are written out by hand (the break-even from the formula in the docstring,
the lines as a user reads them); no torch.compile tracing, so these run in milliseconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mirip.ml import compiled as C

CPU_WHY = ("auto: not compiled on {} (compiling a CPU backbone has not been measured to pay; "
           "--compile on forces it)")


def test_auto_defaults_to_the_recorded_break_even():
    # The default is a placeholder until the GPU check measures it; whatever it is, both functions use it.
    n = C.DEFAULT_MIN_IMAGES
    assert isinstance(n, int) and n > 1
    assert not C.should_compile("auto", n - 1) and C.should_compile("auto", n)
    assert C.compile_decision("auto", n - 1, "cuda") == (False, f"auto: {n - 1} images < break-even {n}")
    assert C.compile_decision("auto", n, "cuda") == (True, f"auto: {n} images >= break-even {n}")


def test_on_and_off_are_obeyed_whatever_the_device_and_count():
    for device in ("cpu", "cuda", "cuda:1", torch.device("cpu"), "mps"):
        for n in (0, 1, 10**7):
            assert C.compile_decision("on", n, device) == (True, "on: asked for (--compile on)")
            assert C.compile_decision("off", n, device) == (False, "off: asked for (--compile off)")
            assert C.should_compile("on", n) is True and C.should_compile("off", n) is False


def test_auto_compiles_only_on_cuda_from_the_break_even_on():
    for device in ("cpu", "mps", torch.device("cpu"), "xla:0"):
        assert C.compile_decision("auto", 10**7, device) == (False, CPU_WHY.format(device))
        assert C.compile_decision("auto", 10**7, device, min_images=1) == (False, CPU_WHY.format(device))
    for device in ("cuda", "cuda:0", "cuda:3"):
        assert C.compile_decision("auto", 9, device, min_images=10) == (False, "auto: 9 images < break-even 10")
        assert C.compile_decision("auto", 10, device, min_images=10) == (True, "auto: 10 images >= break-even 10")
        assert C.compile_decision("auto", 11, device, min_images=10) == (True, "auto: 11 images >= break-even 10")
        assert C.compile_decision("auto", 0, device, min_images=0) == (True, "auto: 0 images >= break-even 0")


def test_should_compile_reads_counts_given_as_other_integer_types():
    import numpy as np

    assert C.should_compile("auto", np.int64(100), min_images=np.int32(100))
    assert not C.should_compile("auto", np.int64(99), min_images=100)
    assert C.should_compile("auto", 100.0, min_images=100) and not C.should_compile("auto", 99.9, min_images=100)


def test_an_unknown_mode_is_refused_with_the_choices():
    for bad in ("always", "ON", "", None):
        with pytest.raises(ValueError) as info:
            C.compile_decision(bad, 10, "cuda")
        assert str(info.value) == f"unknown compile mode {bad!r}; use one of off, auto, on"
        with pytest.raises(ValueError) as info:
            C.should_compile(bad, 10)
        assert str(info.value) == f"unknown compile mode {bad!r}; use one of off, auto, on"


def test_break_even_images_is_the_first_count_that_pays():
    def naive(compile_s, eager, compiled):
        """The smallest n with n * (eager - compiled) > compile_s, by counting."""
        if eager <= compiled:
            return None
        n = 0
        while n * (eager - compiled) <= compile_s:
            n += 1
        return n

    for case in ((10.0, 0.010, 0.004), (10.0, 0.005, 0.002), (1.0, 0.3, 0.1), (0.0, 2.0, 1.0), (5.0, 3.0, 0.5),
                 (7.0, 0.25, 0.0)):
        assert C.break_even_images(*case) == naive(*case), case
    assert C.break_even_images(10.0, 2.0, 1.0) == 11
    assert C.break_even_images(10.0, 1.0, 1.0) is None  # equal speed: never pays (and no division by zero)
    assert C.break_even_images(10.0, 1.0, 1.5) is None


def test_can_compile_names_what_it_cannot_serve():
    trainable = "the backbone is trainable (compiling is for the frozen extractor)"
    hooks = "the feature spec reads intermediate blocks (hooks); only last-block features are compiled"
    assert C.can_compile(SimpleNamespace()) is None  # nothing known: frozen, last block
    assert C.can_compile(SimpleNamespace(frozen=True, num_layers=12)) is None
    assert C.can_compile(SimpleNamespace(frozen=False, num_layers=12)) == trainable
    assert C.can_compile(SimpleNamespace(frozen=True, num_layers=12, entry_blocks=[12, 12])) is None
    assert C.can_compile(SimpleNamespace(frozen=True, num_layers=12, entry_blocks=[11, 12])) == hooks
    assert C.can_compile(SimpleNamespace(frozen=True, num_layers=12, entry_blocks=[12, 3])) == hooks
    assert C.can_compile(SimpleNamespace(num_layers=None, entry_blocks=[1, 2])) is None


def test_describe_gives_the_summary_line():
    assert C.describe(None) == "compile: not recorded" and C.describe({}) == "compile: not recorded"
    eager = C.CompileInfo(False, CPU_WHY.format("cpu")).to_dict()
    assert C.describe(eager) == f"compile: no ({CPU_WHY.format('cpu')}); SDPA backend torch's own choice"
    asked = C.CompileInfo(False, "off: asked for (--compile off)", sdpa_backend="math",
                          extra={"sdpa": "asked for"}).to_dict()
    assert C.describe(asked) == "compile: no (off: asked for (--compile off)); SDPA backend math (asked for)"
    # How the backend was picked is said only when one was.
    assert C.describe({**asked, "extra": {}}) == "compile: no (off: asked for (--compile off)); SDPA backend math"
    assert C.describe({**asked, "extra": None}) == "compile: no (off: asked for (--compile off)); SDPA backend math"
    assert (C.describe({**asked, "sdpa_backend": None}) ==
            "compile: no (off: asked for (--compile off)); SDPA backend torch's own choice")

    done = C.CompileInfo(True, "auto: 5000 images >= break-even 2000", sdpa_backend="flash", compile_seconds=12.34,
                         extra={"sdpa": "measured", "batch_size": 8}).to_dict()
    assert C.describe(done) == (
        "compile: yes (auto: 5000 images >= break-even 2000); SDPA backend flash (measured); torch.compile backend "
        "inductor, mode default, batch 8 (shorter batches padded); compile 12.3 s once")
    lazy = C.CompileInfo(True, "on: asked for (--compile on)", backend="eager", mode="reduce-overhead",
                         extra={"batch_size": None}).to_dict()
    assert C.describe(lazy) == ("compile: yes (on: asked for (--compile on)); SDPA backend torch's own choice; "
                                "torch.compile backend eager, mode reduce-overhead; compiled on first use")
    assert C.describe({**lazy, "compile_seconds": 0.0}).endswith("mode reduce-overhead; compile 0.0 s once")
