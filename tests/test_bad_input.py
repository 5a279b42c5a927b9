"""Every bad input to the launchers ends in one `error:` line on stderr naming the field, flag
or file, exit status 1, no traceback, and no change on disk.

The launchers run as a user runs them: subprocesses, no JAX_PLATFORMS, the `aot` extra's
plugins installed (cli_output.user_env); stderr holds the error line and nothing else, none of
the plugins' start-up notices included.
"""

import json
import os
import subprocess
import sys

import cli_output
import pytest
from train_helpers import synthetic_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
launcher_errors = cli_output.lines


def run_launcher(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                          env=cli_output.user_env(),
                          capture_output=True, text=True, timeout=timeout)


def _tree(path):
    """{relative path: (size, mtime)} of everything under `path`."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return out


def assert_one_line(tmp_path, module, args, *names):
    before = _tree(tmp_path)
    out = run_launcher(module, *args)
    errors = launcher_errors(out.stderr)
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert len(errors) == 1 and errors[0].startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    for name in names:
        assert name in errors[0], (name, errors[0])
    assert _tree(tmp_path) == before, "the failed run changed files on disk"
    return errors[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad inputs of every kind, in one directory that each test also checks is unchanged."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "a_file").write_text("not a directory")
    bad_json = d / "bad_json_hf"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{ 'single': quotes }")
    llama = d / "llama_hf"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}))
    (llama / "model.safetensors").write_bytes(b"")
    no_weights = d / "no_weights_hf"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    store = synthetic_store(str(d / "store"))
    broken = d / "broken_store"
    broken.mkdir()
    (broken / "metadata.json").write_text("{")
    foreign = d / "foreign_workdir"
    foreign.mkdir()
    (foreign / "config.json").write_text("this is not json")
    docs = d / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(20)))
    import zstandard  # the data extra, in the test extra

    (d / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(docs.read_bytes())[:-9])
    return {"dir": d, "store": store}


MICRO = "--config=configs/tiny.py:micro"


@pytest.mark.parametrize("args,names", [
    # overrides and config files
    (["--config.model.no_such_field=1"], ["--config.model.no_such_field", "the fields of model"]),
    (["--config.train.stepz=5"], ["--config.train.stepz", "did you mean --config.train.steps?"]),
    (["--config.trian.steps=5"], ["--config.trian.steps", "did you mean --config.train?"]),
    (["--config.train.steps=abc"], ["--config.train.steps=abc"]),
    (["--config=configs/no_such.py"], ["--config=configs/no_such.py", "no such config file"]),
    (["--config=configs/no_such.py", "--config.train.steps=3"], ["configs/no_such.py"]),
    (["--config=configs/tiny.py:nano"], ["unknown variant 'nano'"]),
    (["--config.model.hidden_size=-1"], ["hidden_size"]),
    (["--config.mesh.data=3"], ["mesh", "3 devices"]),
    (["--profile_steps=2-3"], ["--profile_steps"]),
    (["--no_such_flag=1"], ["no_such_flag"]),
    (["stray_argument"], ["stray_argument"]),
])
def test_train_flags_and_config(tmp_path, inputs, args, names):
    assert_one_line(tmp_path, "launch.train", [MICRO, f"--workdir={tmp_path / 'w'}", *args],
                    *names)


@pytest.mark.parametrize("flag,names", [
    ("--workdir={dir}/a_file", ["--workdir=", "a_file", "is a file"]),
    ("--workdir={dir}/foreign_workdir", ["foreign_workdir/config.json", "new --workdir"]),
    ("--workdir=", ["--workdir is empty"]),
    ("--config.data.path={dir}/broken_store", ["broken_store/metadata.json", "not valid JSON"]),
    ("--config.data.path={dir}/a_file", ["data.path=", "a_file", "not a token store"]),
    ("--init_from_hf={dir}/bad_json_hf", ["bad_json_hf/config.json", "not valid JSON"]),
    ("--init_from_hf={dir}/llama_hf", ["llama_hf/config.json", "model_type='llama'",
                                       "deepseek_v2, deepseek_v3"]),
    ("--init_from_hf={dir}/no_weights_hf", ["no_weights_hf", "no *.safetensors"]),
    ("--init_from_hf={dir}/missing_hf", ["missing_hf", "does not exist"]),
])
def test_train_files_and_directories(tmp_path, inputs, flag, names):
    d = inputs["dir"]
    args = [flag.format(dir=d)]
    if not flag.startswith("--workdir"):
        args.append(f"--workdir={tmp_path / 'w'}")
    assert_one_line(d, "launch.train", [MICRO, *args], *names)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("args,names", [
    ([], ["exactly one of --hf=DIR or --checkpoint=DIR"]),
    (["--checkpoint={dir}/missing", "--prompt=x"], ["--checkpoint=", "missing"]),
    (["--checkpoint={dir}", "--prompt=x"], ["--checkpoint=", "config.json"]),
    (["--checkpoint={dir}/foreign_workdir", "--prompt=x"], ["foreign_workdir/config.json"]),
    (["--hf={dir}/llama_hf", "--prompt=x"], ["model_type='llama'"]),
    (["--hf={dir}/bad_json_hf", "--prompt=x"], ["bad_json_hf/config.json"]),
    (["--hf={dir}/llama_hf"], ["--prompt"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--top_p=1.5"], ["--top_p"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--max_new_tokens=0"], ["--max_new_tokens"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--temperature=-1"], ["--temperature"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--mesh=experts=2"], ["--mesh", "'experts'"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--tokenizer={dir}/none.json"], ["none.json"]),
    (["--hf={dir}/llama_hf", "--prompt=x", "--tokenizer={dir}/a_file"], ["a_file"]),
])
def test_generate_flags(inputs, args, names):
    d = inputs["dir"]
    assert_one_line(d, "launch.generate", [a.format(dir=d) for a in args], *names)


@pytest.mark.parametrize("args,names", [
    (["--input={dir}/*.none", "--output={dir}/new"], ["--input=", "matches no files"]),
    (["--input={dir}/docs.jsonl", "--output={dir}/store"], ["--output=", "already exists"]),
    (["--input={dir}/docs.jsonl", "--output={dir}/new"], ["docs.jsonl:1", "--text_key"]),
    (["--input={dir}/docs.jsonl", "--output={dir}/new", "--text_key=body", "--val_fraction=1.5"],
     ["--val_fraction"]),
    (["--input={dir}/docs.jsonl", "--output={dir}/new", "--tokenizer=gpt2"], ["tokenizer", "gpt2"]),
    (["--input={dir}/cut.jsonl.zst", "--output={dir}/new", "--text_key=body", "--workers=1"],
     ["cut.jsonl.zst", "truncated zstd"]),
])
def test_prepare_data_flags(inputs, args, names):
    d = inputs["dir"]
    assert_one_line(d, "launch.prepare_data", [a.format(dir=d) for a in args], *names)
