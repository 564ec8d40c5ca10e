import errno
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import benchmark
import data
import evaluate
import models
import segment
import train
from test_hydes import palette_png, tiny_run, write_images, write_voc


def png_header_claiming(width, height):
    """The bytes of a PNG whose header claims width x height pixels, with no pixel data: a decompression
    bomb to PIL (over twice its limit of 89 million pixels), a few dozen bytes on disk."""
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# ---- data.py

def test_test_labels_follow_the_train_splits_class_names_and_an_unknown_class_is_refused(tmp_path):
    for cls in ("a", "b", "c"):
        write_images(tmp_path / "train" / cls, 2, size=8)
    for cls in ("a", "c"):                                     # the test split lacks b
        write_images(tmp_path / "test" / cls, 2, size=8)
    test = data.dataset_split("folder", str(tmp_path), "test", None)
    assert test.classes == ["a", "b", "c"] and sorted(set(test.targets)) == [0, 2]      # c is 2, as in train
    assert [test.classes[label] for _, label in test.samples] == [os.path.basename(os.path.dirname(p))
                                                                  for p, _ in test.samples]
    write_images(tmp_path / "test" / "d", 2, size=8)           # a class train never saw
    with pytest.raises(data.DatasetError, match="has a class the training split lacks, 'd'"):
        data.dataset_split("folder", str(tmp_path), "test", None)


def test_a_folders_resolution_is_the_median_of_all_its_headers_and_unreadable_files_are_passed_over(tmp_path, capsys):
    write_images(tmp_path / "train" / "a", 5, size=32)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "train" / "a" / "000-small.jpg")  # sorts first
    assert data.native_image_size("folder", str(tmp_path)) == 32
    args, _ = train.settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert (args.global_size, args.local_size) == (32, 16) and not (tmp_path / "run").exists()
    assert "holds images of 2 sizes (shorter sides 16 to 32 px); crops follow the median shorter side, 32 px" \
        in capsys.readouterr().out
    (tmp_path / "train" / "a" / "0-empty.jpg").write_bytes(b"")                  # unreadable, and first
    (tmp_path / "train" / "a" / "0-bomb.png").write_bytes(png_header_claiming(30000, 30000))
    assert data.native_image_size("folder", str(tmp_path)) == 32
    assert data.folder_image_sizes(str(tmp_path)) == {(32, 32): 5, (16, 16): 1}
    with pytest.raises(data.DatasetError, match="cannot read image .*0-bomb.png"):
        data.read_rgb(tmp_path / "train" / "a" / "0-bomb.png")


def test_a_log_cut_short_loses_only_its_last_line_and_a_broken_middle_line_is_named(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert data.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "ends in a line cut short" in capsys.readouterr().out
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(data.DatasetError, match="line 2, is not JSON"):
        data.read_jsonl(path)


# ---- models.py

def test_a_full_disk_during_a_checkpoint_write_says_so_and_leaves_only_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    models.save_checkpoint(path, {"step": 1})

    def disk_full(state, f):
        f.write(b"PK\x03\x04 part of a zip file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(models.CheckpointError, match=r"cannot write .*ckpt.pt \(No space left on device\); the previous"):
        models.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_second_writer_of_the_same_checkpoint_mid_write_breaks_neither(tmp_path, monkeypatch):
    # Writer A is half-way through its bytes when writer B (another process on the same folder, or another
    # evaluate.py filling the same cache) writes the same path from start to finish. With one fixed
    # temporary name they would share a file: B truncates A's bytes and renames them away, and A then
    # fails or overwrites the checkpoint in place. With a temporary name per writer both complete.
    path, real_save = str(tmp_path / "ckpt.pt"), torch.save

    def interleaved(state, f):
        if state["writer"] == "A":
            f.write(b"PK\x03\x04")                                  # A has begun its file...
            f.seek(0)
            models.save_checkpoint(path, {"writer": "B", "weights": torch.ones(1000)})   # ...B writes it all
        real_save(state, f)

    monkeypatch.setattr(torch, "save", interleaved)
    models.save_checkpoint(path, {"writer": "A", "weights": torch.zeros(10)})
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["writer"] == "A" and torch.equal(state["weights"], torch.zeros(10))     # the last rename wins
    assert os.listdir(tmp_path) == ["ckpt.pt"]                 # no temporary file left behind


def test_the_feature_cache_follows_the_files_and_an_unreadable_cache_is_extracted_anew(tmp_path, monkeypatch, capsys):
    for cls in ("a", "b"):
        write_images(tmp_path / "images" / "train" / cls, 3)
    backbone = models.build_backbone("resnet18", 32, width=8)
    calls = []
    real_extract = models.extract_features
    monkeypatch.setattr(models, "extract_features", lambda *a, **kw: calls.append(1) or real_extract(*a, **kw))

    def features():
        return models.cached_features(backbone, "digest", "folder", str(tmp_path / "images"), "train", 32,
                                      torch.device("cpu"), str(tmp_path / "cache"), workers=0)

    assert features()[2] is False and features()[2] is True and len(calls) == 1
    write_images(tmp_path / "images" / "train" / "b", 4, seed=1)     # 3 images replaced and one added
    feats, labels, cached = features()
    assert not cached and len(calls) == 2 and len(labels) == 7
    for cache_file in os.listdir(tmp_path / "cache"):                # cache files that cannot be read
        (tmp_path / "cache" / cache_file).write_bytes(b"cut short")
    assert features()[2] is False and len(calls) == 3 and "unreadable" in capsys.readouterr().out


def test_a_file_holding_a_bare_tensor_is_refused_in_one_line(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    for name, kind in (("tensor.pt", "Tensor"), ("list.pt", "list")):
        with pytest.raises(SystemExit, match=f"^error: .*{name} holds a {kind}, not a state_dict"):
            evaluate.main([str(tmp_path / name), "--arch", "resnet18", "--dataset", "folder", "--workers", "0",
                           "--image-size", "32", "--data-dir", str(tmp_path)])


# ---- segment.py

def test_a_voc_mask_of_another_size_than_its_image_is_refused(tmp_path):
    write_voc(tmp_path, ["a"], ["b"])
    palette_png(np.zeros((40, 56), np.uint8)).save(tmp_path / "SegmentationClass" / "a.png")   # image: 48 x 56
    with pytest.raises(segment.VOCError, match=r"a.png is 56x40 px but its image is 56x48"):
        segment.VOCSegmentation(str(tmp_path), "train", 48)[0]


# ---- every script's numbers, up front

@pytest.mark.parametrize("script, extra, message", [
    (evaluate, ["--knn-k", "0"], "--knn-k must be >= 1"),
    (evaluate, ["--knn-temperature", "-0.1"], "--knn-k must be >= 1 and --knn-temperature > 0"),
    (evaluate, ["--probe-epochs", "0"], "--probe-epochs must be >= 1"),
    (segment, ["--epochs", "0"], "--epochs and --batch-size must be >= 1"),
    (segment, ["--image-size", "16"], "--image-size must be >= 32"),
    (analyze, ["--pairs", "1"], "--pairs must be >= 2"),
    (analyze, ["--permutations", "0"], "--permutations must be >= 1"),
    (analyze, ["--smooth-samples", "0"], "--smooth-samples must be >= 1"),
])
def test_probe_arguments_are_checked_before_any_work(tmp_path, script, extra, message):
    with pytest.raises(SystemExit, match="^error: " + message.replace("+", r"\+").replace(".", r"\.")):
        script.main([str(tmp_path / "no-such-checkpoint.pt"), *extra])      # refused before it is even opened


def test_benchmark_arguments_are_checked():
    with pytest.raises(SystemExit, match="--seconds must be > 0"):
        benchmark.main(["--seconds", "0"])


def test_an_output_folder_that_cannot_be_written_is_named_in_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    blocked = str(tmp_path / "file" / "out")                   # a path through a file: nothing can be made there
    with pytest.raises(SystemExit, match=rf"^error: cannot write in {blocked} \(Not a directory\); pick a writable --out"):
        train.main(tiny_run(tmp_path) + ["--out", blocked, "--epochs", "1"])
    for script, option in ((evaluate, "--cache-dir"), (analyze, "--out"), (segment, "--out")):
        with pytest.raises(SystemExit, match=f"^error: cannot write in .*; pass {option} with a writable folder"):
            script.main([str(tmp_path / "ckpt.pt"), option, blocked])


# ---- train.py: the epoch is saved before the k-NN, and nothing lost to a fault during it

def test_a_bad_test_image_stops_the_monitor_after_the_epoch_is_saved_and_resume_restores_its_log_line(tmp_path):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--eval-every", "1", "--knn-k", "3"]
    bad = tmp_path / "images" / "test" / "a" / "001.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:200])
    with pytest.raises(SystemExit) as error:
        train.main(common + ["--epochs", "2"])
    message = str(error.value.code)
    assert message.startswith(f"error: cannot read image {bad}") and "was saved before the k-NN" in message
    assert "\n" not in message
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert saved["step"] == 2 and saved["log_record"]["step"] == 2 and "knn_top1" not in saved["log_record"]
    assert not (tmp_path / "run" / "log.jsonl").exists()       # the epoch's line was due after the k-NN
    bad.write_bytes(good)
    train.main(common + ["--epochs", "2", "--resume"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [2, 4] and log[0]["loss"] == saved["log_record"]["loss"]
    assert "knn_top1" in log[1]


def test_skip_bad_images_also_skips_them_in_the_monitors_k_nn(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--eval-every", "1", "--knn-k", "3", "--epochs", "1"]
    (tmp_path / "images" / "test" / "b" / "002.jpg").write_bytes(b"")
    train.main(common + ["--skip-bad-images"])
    (record,) = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert 0 <= record["knn_top1"] <= 100


@pytest.mark.parametrize("signum, dies", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_signal_during_the_k_nn_keeps_the_saved_epoch_and_its_log_line(tmp_path, monkeypatch, signum, dies):
    real = train.knn_evaluate

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signum)
        if dies:                        # a SIGTERM to the whole job: the k-NN's loading workers die with it
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Terminated.")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "knn_evaluate", signalled)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_run(tmp_path) + ["--out", str(out), "--eval-every", "1", "--knn-k", "3", "--epochs", "3"])
    assert stopped.value.code == 128 + signum
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2
    (record,) = [json.loads(line) for line in open(out / "log.jsonl")]
    assert record["step"] == 2 and ("knn_top1" in record) != dies


def test_a_log_cut_short_by_a_kill_is_mended_on_resume_and_read_by_the_curves(tmp_path, capsys):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    train.main(common + ["--epochs", "1"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "ste')                           # a kill while the line was appended
    assert analyze.read_curves([str(out)], "loss")[str(out)][0] == (1,)
    train.main(common + ["--epochs", "2", "--resume"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4]
    assert "cut short" in capsys.readouterr().out


def test_a_second_train_py_on_the_same_folder_is_refused_and_a_killed_ones_lock_is_not_stuck(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.abspath(train.__file__), *tiny_run(tmp_path), "--out", str(out),
               "--epochs", "1000"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "args.json").exists() and time.time() < deadline:     # the folder is claimed
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert second.stderr.strip() == (f"error: another train.py (process {first.pid}) is running in {out}; "
                                         f"wait for it to end, or pick another --out")
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    train.main(tiny_run(tmp_path) + ["--out", str(out), "--epochs", "1", "--force"])    # the lock died with it
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_two_evaluations_of_one_checkpoint_at_once_share_the_feature_cache(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    command = [sys.executable, os.path.abspath(evaluate.__file__), str(tmp_path / "run" / "ckpt.pt"), "--workers", "0",
               "--probe", "knn", "--knn-k", "3"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    results = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert len(results) == 2 and results[0]["knn_top1"] == results[1]["knn_top1"]
    assert sorted(os.listdir(tmp_path / "run" / "features"))[0].endswith(".pt")
    assert not [f for f in os.listdir(tmp_path / "run" / "features") if f.endswith(".tmp")]


def test_images_that_cannot_be_opened_in_a_folder_are_one_line_errors_or_skipped(tmp_path, capsys):
    common = tiny_run(tmp_path) + ["--epochs", "1"]
    empty = tmp_path / "images" / "train" / "a" / "000-empty.jpg"          # sorts first: used to pick the size
    empty.write_bytes(b"")
    bomb = tmp_path / "images" / "train" / "b" / "000-bomb.png"
    bomb.write_bytes(png_header_claiming(30000, 30000))
    with pytest.raises(SystemExit) as error:
        train.main(common + ["--out", str(tmp_path / "run")])
    assert str(error.value.code).startswith("error: cannot read image ") and "\n" not in str(error.value.code)
    train.main(common + ["--out", str(tmp_path / "run2"), "--skip-bad-images"])
    assert "skipping 2 unreadable image(s) of 18" in capsys.readouterr().out


def test_analyze_reports_an_image_a_loading_worker_could_not_read_in_one_line(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    (tmp_path / "images" / "test" / "a" / "000.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as error:
        analyze.main([str(tmp_path / "run" / "ckpt.pt"), "--workers", "1", "--positive-images", "0", "--images", "0"])
    assert str(error.value.code).startswith("error: cannot read image ") and "\n" not in str(error.value.code)
