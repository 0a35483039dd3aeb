"""scripts/bench's llama-server peer: its build script's cache, the ratios and the table."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.peer import find_binary  # noqa: E402
from benchmarks.peer_bench import shape_name  # noqa: E402
from benchmarks.peer_report import conclude_peer, peer_table  # noqa: E402
from benchmarks.serving import PARTS, counts, parts, shape  # noqa: E402


def load(req_s: float, p50: float) -> dict[str, Any]:
    return {"req_s": req_s, "latency_ms": {"p50": p50, "p99": p50 * 2}}


def peer_results() -> dict[str, Any]:
    decode = {"decode_tok_s": {"p50": 50.0}, "total_ms": {"p50": 2600.0},
              "ttft_ms": {"p50": 40.0}, "completion_tokens": [128]}  # fmt: skip
    return {
        "cores": 2,
        "daemon": {
            "load": {k: load(8.0, 500.0) for k in ("1", "4", "16", "4+hog")},
            "decode": {"idle": decode, "hog": decode | {"decode_tok_s": {"p50": 40.0}}},
            "alone_vs_batched": {"identical": 12, "of": 12, "tokens": 32},
        },
        "llama_server": {
            "np1": {
                "load": {k: load(4.0, 250.0) for k in ("1", "4", "16", "4+hog")},
                "decode": {"idle": decode, "hog": decode},
            },
            "np4": {"load": {"4": load(10.0, 400.0), "4+hog": load(2.0, 2000.0)}},
            "np16": {"load": {"16": load(5.0, 3000.0)}},
        },
    }


def test_peer_ratios_compare_the_daemon_with_the_best_llama_server_configuration() -> None:
    p = peer_results()
    conclude_peer(p)
    r = p["ratios"]
    assert r["req_s_4_clients_best_is"] == "np4"
    assert r["req_s_4_clients_daemon_over_best"] == 0.8
    assert r["req_s_4_clients_target_ge_1.2_met"] is False
    assert r["req_s_4_clients_daemon_over_np1"] == 2.0
    assert r["req_s_16_clients_best_is"] == "np16"
    assert r["req_s_4+hog_clients_daemon_over_best"] == 2.0  # np1's 4.0 beats np4's 2.0
    assert r["req_s_4+hog_clients_target_ge_2.0_met"] is True
    assert r["latency_p50_4_clients_daemon_over_best"] == 1.25
    assert r["decode_tok_s_idle_daemon_over_np1"] == 1.0
    assert r["daemon_decode_hog_over_idle"] == 0.8
    assert r["daemon_decode_hog_target_ge_0.9_met"] is False


def test_peer_table_shows_each_configuration_and_the_ratio_to_the_best() -> None:
    p = peer_results()
    conclude_peer(p)
    text = peer_table({"peer": p, "machine": {"cpu_model": "Test CPU 9000"}})
    assert "Test CPU 9000" in text
    four = next(line for line in text.splitlines() if line.startswith("req/s, 4 client(s)"))
    assert four.split()[3:7] == ["8.00", "4.00", "10.00", "n/a"]
    assert "0.80x vs np4 (>=1.2)" in four
    assert "daemon: 12 of 12" in text


def test_other_daemon_shapes_are_compared_with_the_best_llama_server_and_the_default() -> None:
    p = peer_results()
    p["daemons"] = {
        "daemon_p4": {
            "shape": {"parallel": 4},
            "load": {k: load(12.0, 300.0) for k in ("1", "4", "16", "4+hog")},
            "alone_vs_batched": {"identical": 11, "of": 12, "tokens": 32},
        }
    }
    conclude_peer(p)
    r = p["ratios"]
    assert r["req_s_4_clients_daemon_p4_over_best"] == 1.2  # np4's 10.0
    assert r["req_s_4_clients_daemon_p4_over_daemon"] == 1.5
    text = peer_table({"peer": p, "machine": {"cpu_model": "x"}})
    line = next(x for x in text.splitlines() if x.startswith("daemon_p4 (parallel=4)"))
    assert "12.00 / 12.00 / 12.00 / 12.00" in line and "1.50 / 1.50 / 1.50 / 1.50" in line
    assert "daemon_p4: 11 of 12" in text


def test_peer_shape_takes_settings_and_names_the_daemon_after_them() -> None:
    assert shape("parallel=4, kv_cache=f16") == {"parallel": 4, "kv_cache": "f16"}
    for bad in ("", "parallel", "=4", "kv_cache="):
        with pytest.raises(argparse.ArgumentTypeError):
            shape(bad)
    assert shape_name({"parallel": 4}) == "daemon_p4"
    assert shape_name({"parallel": 4, "kv_cache": "f16"}) == "daemon_p4-kv_cache=f16"
    p = peer_results()
    p["daemons"] = {
        "daemon_p4-kv_cache=f16": {
            "shape": {"parallel": 4, "kv_cache": "f16"},
            "load": {k: load(12.0, 300.0) for k in ("1", "4", "16", "4+hog")},
        }
    }
    conclude_peer(p)
    assert p["ratios"]["req_s_4_clients_daemon_p4-kv_cache=f16_over_best"] == 1.2
    text = peer_table({"peer": p, "machine": {"cpu_model": "x"}})
    assert any(
        x.startswith("daemon_p4-kv_cache=f16 (parallel=4, kv_cache=f16)") for x in text.splitlines()
    )


def test_peer_parallel_takes_positive_counts() -> None:
    assert counts("1,4") == (1, 4)
    for bad in ("", "0", "x", "4,-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            counts(bad)


def test_peer_table_says_why_the_llama_server_column_was_skipped() -> None:
    p: dict[str, Any] = {"cores": 2, "skipped": "cmake missing", "daemon": {}, "llama_server": {}}
    conclude_peer(p)
    text = peer_table({"peer": p, "machine": {"cpu_model": "x"}})
    assert "SKIPPED: cmake missing" in text
    assert p["ratios"] == {}


def test_only_takes_known_parts_in_the_order_given() -> None:
    assert parts("peer, transport") == ("peer", "transport")
    assert set(PARTS) >= {"side", "peer", "transport", "zero_shot", "embed"}
    for bad in ("", "peer,nope"):
        with pytest.raises(argparse.ArgumentTypeError):
            parts(bad)


def test_a_given_binary_that_does_not_exist_is_a_reason_to_skip(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIDECAR_LLAMA_SERVER", str(tmp_path / "nope"))
    binary, why = find_binary()
    assert binary is None
    assert "not an executable file" in why


def test_build_script_returns_a_cached_binary_at_once(tmp_path: Path) -> None:
    pinned = next(
        line.split("==")[1].strip(' ",')
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if line.strip().startswith('"llama-cpp-python==')
    )
    binary = tmp_path / pinned / "build" / "bin" / "llama-server"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    t = time.monotonic()
    r = subprocess.run(
        [str(REPO / "scripts" / "build-llama-server")],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "SIDECAR_LLAMA_SERVER_CACHE": str(tmp_path),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert r.stdout.strip() == str(binary)
    assert time.monotonic() - t < 5


def test_the_embed_part_reports_texts_per_second_and_the_ratio_at_each_load() -> None:
    from benchmarks.serving_report import daemon_only_lines

    d = {"texts_per_s": 21.0, "errors": 0, "ratio_vs_one_text_per_decode": 1.35}
    r = {"embed_short": {"reference": "one text per decode", "target_ratio_8_clients": 4.0,
                         "daemon": {"1": d | {"texts_per_s": 18.1}, "8": d}}}  # fmt: skip
    lines = daemon_only_lines(r).strip().splitlines()
    assert lines[0].startswith("Embed, short texts, 1 client(s) (daemon): 18.1 texts/s")
    assert "target" not in lines[0]
    assert lines[1].endswith("1.35x one text per decode (target at 8: >= 4.0x)")
