"""The CLI, run for real: typer's CliRunner in-process, and the installed module as a subprocess."""

import json

from typer.testing import CliRunner

from moe_offload.cli import app
from test_loading import run_cli

runner = CliRunner()


def test_generate_json(tiny_dir, tiny_engine):
    result = runner.invoke(app, ["generate", str(tiny_dir), "--prompt", "Hello", "--temperature", "0",
                                 "--max-new-tokens", "8", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) >= {"text", "tokens", "prompt_tokens", "completion_tokens", "prefill_tok_s", "decode_tok_s"}
    expected = tiny_engine.generate("Hello", max_new_tokens=8)
    assert data["tokens"] == expected.tokens and data["text"] == expected.text
    assert data["completion_tokens"] == len(data["tokens"]) and data["prompt_tokens"] == len(tiny_engine.encode("Hello"))


def test_generate_streams_text(tiny_dir, tiny_engine):
    result = runner.invoke(app, ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0",
                                 "--max-new-tokens", "8"])
    assert result.exit_code == 0
    assert result.stdout == tiny_engine.generate("Hello", max_new_tokens=8).text + "\n"


def test_chat_multi_turn_reset_exit(tiny_dir, tiny_engine):
    result = runner.invoke(app, ["chat", str(tiny_dir), "--temperature", "0", "--max-new-tokens", "6"],
                           input="Hello\nMore please\n/reset\nHello\n/exit\n")
    assert result.exit_code == 0, result.output
    chat = tiny_engine.new_chat()
    first = chat.send("Hello", tiny_engine_params()).result().text
    second = chat.send("More please", tiny_engine_params()).result().text
    # after /reset the conversation starts over, so the third answer repeats the first
    assert result.stdout == f">>> {first}\n>>> {second}\n>>> >>> {first}\n>>> "
    assert "cleared" in result.stderr


def tiny_engine_params():
    from moe_offload import SamplingParams

    return SamplingParams(max_new_tokens=6)


def test_bad_input_one_line_no_traceback(tmp_path, tiny_dir):
    cases = [
        (["generate", str(tmp_path / "missing"), "-p", "x"], "no such model directory"),
        (["generate", str(tiny_dir), "-p", "x", "--dtype", "float8"], "--dtype"),
        (["generate", str(tiny_dir), "-p", "x", "--top-p", "2"], "top_p"),
        (["generate", str(tiny_dir), "-p", "word " * 300, "--max-context", "64"], "context window is 64"),
    ]
    for args, fragment in cases:
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
        lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr


def test_quantize_command_then_generate(tiny_dir, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_dir), str(out), "--preset", "4/4", "--expert-bits", "3",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "moe_offload.json").read_text())
    assert manifest["quantization"]["experts"] == {"bits": 3, "group_size": 64, "quant_meta": False, "meta_bits": 8}
    again = runner.invoke(app, ["quantize", str(tiny_dir), str(out)])
    assert again.exit_code == 1 and "already exists" in again.stderr
    gen = runner.invoke(app, ["generate", str(out), "-p", "Hello", "--temperature", "0", "--max-new-tokens", "4",
                              "--json"])
    assert gen.exit_code == 0, gen.output
    assert json.loads(gen.stdout)["completion_tokens"] == 4


def test_quantize_bad_settings(tiny_dir, tmp_path):
    bad_preset = runner.invoke(app, ["quantize", str(tiny_dir), str(tmp_path / "a"), "--preset", "3/1"])
    assert bad_preset.exit_code == 1 and "--preset '3/1' is unknown" in bad_preset.stderr
    bad_group = runner.invoke(app, ["quantize", str(tiny_dir), str(tmp_path / "b"), "--expert-group", "256",
                                    "--device", "cpu"])
    assert bad_group.exit_code == 1 and "group_size=256 must divide K=64" in bad_group.stderr
    assert not (tmp_path / "b").exists()
    bad_meta = runner.invoke(app, ["quantize", str(tiny_dir), str(tmp_path / "c"), "--expert-meta-bits", "6"])
    assert bad_meta.exit_code == 1 and "--expert-meta-bits 6 is not supported; choose 8 or 4" in bad_meta.stderr
    assert not (tmp_path / "c").exists()


def test_quantize_with_4bit_scales(tiny_dir, tmp_path):
    """--expert-meta-bits 4 on 4/2 is the 4/2-lean preset's experts (one metadata byte per group), and the checkpoint
    loads to the same logits as quantizing 4/2-lean while loading."""
    import torch

    import moe_offload

    out = tmp_path / "lean"
    result = runner.invoke(app, ["quantize", str(tiny_dir), str(out), "--preset", "4/2", "--expert-meta-bits", "4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "experts 2-bit g16 with 4-bit scales/zeros" in result.stderr
    manifest = json.loads((out / "moe_offload.json").read_text())
    assert manifest["quantization"]["experts"] == {"bits": 2, "group_size": 16, "quant_meta": True, "meta_bits": 4}
    assert manifest["quantization"]["preset"] == "4/2-lean"  # overrides that land on a named preset take its name
    ids = torch.tensor([list(range(3, 30))])
    a, b = (moe_offload.load(d, device="cpu", dtype="float32", **kw) for d, kw in ((out, {}),
                                                                                  (tiny_dir, {"quantize": "4/2-lean"})))
    torch.testing.assert_close(a.model(ids, a.model.new_kv_cache(64), 0), b.model(ids, b.model.new_kv_cache(64), 0),
                               atol=0, rtol=0)


def test_chat_ctrl_c_stops_the_answer_not_the_program(tiny_dir):
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_offload", "chat", str(tiny_dir), "--max-new-tokens", "100000", "--max-context",
         "4096", "--temperature", "1.0", "--top-p", "1.0", "--seed", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        seen, deadline = b"", time.time() + 90
        while len(seen) < 40 and time.time() < deadline:  # the prompt, then streamed answer text
            if select.select([proc.stdout], [], [], 1)[0]:
                seen += os.read(proc.stdout.fileno(), 4096)
        assert len(seen) >= 40, seen
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"[stopped]" in seen + out and b"Traceback" not in err


def test_generate_with_int8_activations(tiny_dir):
    """--int8-activations reaches the engine: the command answers as the API does with the option."""
    from moe_offload.engine import load

    args = ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0", "--max-new-tokens", "6", "--json",
            "--device", "cpu", "--quantize", "4/2"]
    result = runner.invoke(app, args + ["--int8-activations"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = load(tiny_dir, device="cpu", quantize="4/2", int8_activations=True).generate("Hello", max_new_tokens=6)
    assert data["tokens"] == expected.tokens
