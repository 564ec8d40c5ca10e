"""Outputs that never destroy, devices, broken inputs, vanishing data, pasteable output (to merge into
test_hydes.py)."""

import errno
import json
import math
import os
import shlex
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import benchmark
import checkpoints
import evaluate
import hydes
import segment
import settings
import train
from test_hydes import tiny_run, write_images, write_voc


# ---- outputs never destroy what they should not

def test_export_refuses_an_existing_file_the_checkpoint_it_reads_and_a_device_node(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    checkpoint = tmp_path / "run" / "ckpt.pt"
    before = checkpoint.read_bytes()
    for force in ([], ["--force"]):              # the checkpoint read is never replaced, even with --force
        with pytest.raises(SystemExit, match=r"ckpt.pt is the file this command reads; pass another --export"):
            evaluate.main([str(checkpoint), "--export", str(checkpoint), *force])
    assert checkpoint.read_bytes() == before
    exported = tmp_path / "backbone.pth"
    exported.write_bytes(b"the user's file")
    with pytest.raises(SystemExit, match=r"backbone.pth exists; pass --force to replace it, or another --export"):
        evaluate.main([str(checkpoint), "--export", str(exported)])
    assert exported.read_bytes() == b"the user's file"
    evaluate.main([str(checkpoint), "--export", str(exported), "--force"])
    assert set(torch.load(exported, weights_only=True)) >= {"conv1.weight", "fc.weight"} - {"fc.weight"}
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)                                          # a node that is not a regular file, made here
    with pytest.raises(SystemExit, match=r"pipe exists and is not a regular file .*; pass another --export"):
        evaluate.main([str(checkpoint), "--export", str(pipe), "--force"])
    with pytest.raises(OSError, match="is not a regular file"):                 # and at the write itself
        checkpoints.write_atomically(str(pipe), lambda f: f.write(b"x"))
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)
    if os.geteuid() == 0:                                    # a character device of our own, never /dev/null
        node = tmp_path / "null"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        with pytest.raises(OSError, match="is not a regular file"):
            checkpoints.write_atomically(str(node), lambda f: f.write(b"x"))
        assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_pictures_are_replaced_only_with_force(tmp_path):
    import sphere
    picture = tmp_path / "sphere.png"
    picture.write_bytes(b"the user's figure")
    argv = ["--steps", "0", "1", "--out", str(picture)]
    with pytest.raises(SystemExit, match=r"sphere.png exists; pass --force to replace it, or another --out"):
        sphere.main(argv)
    with pytest.raises(SystemExit, match=r"sphere.png exists; pass --force to replace it, or another --out"):
        analyze.main(["curves", str(tmp_path), "--out", str(picture)])
    assert picture.read_bytes() == b"the user's figure"
    sphere.main(argv + ["--force"])
    assert Image.open(picture).format == "PNG"
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "saliency.png").write_bytes(b"an earlier run's")
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    checkpoint = str(tmp_path / "run" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"saliency.png exists; pass --force to replace it, or another --out"):
        analyze.main([checkpoint, "--out", str(tmp_path / "analysis")])
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "pca_hypercolumns.png").write_bytes(b"an earlier run's")
    with pytest.raises(SystemExit, match=r"pca_hypercolumns.png exists; pass --force to replace it, or another --out"):
        segment.main([checkpoint, "--out", str(tmp_path / "seg")])


def full_disk_after(byte_count, monkeypatch):
    """os.write takes `byte_count` bytes in all, then fails as a full disk does."""
    real_write, left = os.write, [byte_count]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real_write(fd, bytes(data[:left[0]]))
        left[0] -= written
        return written
    monkeypatch.setattr(os, "write", write)


def test_an_append_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "eval.jsonl"
    checkpoints.append_jsonl(str(path), {"knn_top1": 50.0})
    before = path.read_bytes()
    full_disk_after(5, monkeypatch)                          # half a line would be written, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        checkpoints.append_jsonl(str(path), {"knn_top1": 60.0})
    assert path.read_bytes() == before
    table = tmp_path / "table.md"
    with pytest.raises(SystemExit, match=r"could not write .*eval.jsonl .*table.md"):
        checkpoints.keep_results({"knn_top1": 70.0}, str(path), [({"knn_top1": 70.0}, ("knn_top1",), str(table))])
    monkeypatch.undo()
    assert path.read_bytes() == before and table.read_text() == ""       # the table: created, nothing appended
    checkpoints.append_jsonl(str(path), {"knn_top1": 80.0})
    assert [r["knn_top1"] for r in checkpoints.read_jsonl(str(path))] == [50.0, 80.0]   # no line glued on


def test_kept_copies_and_log_lines_that_cannot_be_written_are_one_line_and_the_checkpoint_survives(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    real_save = torch.save

    def save(state, f, *args, **kwargs):              # the kept copy meets a full disk halfway
        if "ckpt-epoch" in getattr(f, "name", ""):
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*ckpt-epoch1.pt \(No space left on device\); "
                                         r".*ckpt.pt holds this epoch: free disk space, then continue with --resume$"):
        train.main(common + ["--epochs", "1", "--keep-every", "1"])
    monkeypatch.undo()
    assert not [name for name in os.listdir(out) if name.startswith("ckpt-epoch")]     # no truncated copy
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2

    def full_disk(path, text):                         # log.jsonl cannot take the second epoch's line
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "append_whole", full_disk)
    with pytest.raises(SystemExit, match=r"^error: cannot append to .*log.jsonl \(No space left on device\); "
                                         r".*ckpt.pt holds this epoch and its log line"):
        train.main(common + ["--epochs", "2", "--resume"])
    monkeypatch.undo()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    train.main(common + ["--epochs", "3", "--resume"])      # each resumed run wrote the line its checkpoint held
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [2, 4, 6]


def test_resume_with_nothing_to_do_touches_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    train.main(common + ["--epochs", "1"])
    with open(out / "log.jsonl", "a") as f:               # a line the checkpoint does not hold (killed before a save)
        f.write(json.dumps({"epoch": 2.0, "step": 4}) + "\n")
    files = {name: (out / name).read_bytes() for name in ("log.jsonl", "args.json", "ckpt.pt")}
    for again in ([], ["--epochs", "1"]):
        train.main(common + ["--resume", *again])
        assert "has trained 1 epochs already; raise --epochs" in capsys.readouterr().out
        assert {name: (out / name).read_bytes() for name in files} == files


# ---- every file read is named

def test_resume_refuses_a_checkpoint_without_optimizer_and_data_of_other_classes(tmp_path):
    out = tmp_path / "run"
    common = tiny_run(tmp_path) + ["--out", str(out)]
    train.main(common + ["--epochs", "1"])
    for cls in ("a", "b", "c"):                        # as many train images (16), but three classes
        write_images(tmp_path / "three" / "train" / cls, 6 if cls != "c" else 4)
        write_images(tmp_path / "three" / "test" / cls, 2)
    with pytest.raises(SystemExit, match=r"^error: the checkpoint was trained on data of 2 classes but the data now "
                                         r"has 3; resume with the same data \(--data-dir\)$"):
        train.main(common + ["--epochs", "2", "--resume", "--data-dir", str(tmp_path / "three")])
    state = torch.load(out / "ckpt.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, out / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"^error: .*ckpt.pt holds no optimizer \(saved for evaluation only\?\), so "
                                         r"the run cannot continue exactly"):
        train.main(common + ["--epochs", "2", "--resume"])


def test_skip_bad_images_checks_every_split_before_the_first_step(tmp_path):
    common = tiny_run(tmp_path) + ["--epochs", "1", "--eval-every", "1", "--skip-bad-images"]
    for path in (tmp_path / "images" / "test").rglob("*.jpg"):
        path.write_bytes(b"not a JPEG")
    with pytest.raises(SystemExit, match=r"^error: none of the 8 images of the test split decodes, for example "):
        train.main(common + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# ---- devices: one check for every script

@pytest.mark.parametrize("device, gpus, mps, message", [
    ("foo", 0, False, "'foo' is not a device; pass cpu, cuda, cuda:N or mps"),
    ("cuda", 0, False, "cuda, but PyTorch sees no CUDA GPU here; pass --device cpu"),
    ("cuda:7", 1, False, "cuda:7, but PyTorch sees 1 GPU(s), cuda:0 to cuda:0; pass one of those"),
    ("mps", 0, False, "mps (an Apple GPU), but this PyTorch has no MPS device here; pass --device cpu"),
    ("meta", 0, False, "meta: these scripts run on cpu, cuda or mps")])
def test_every_script_refuses_a_device_it_cannot_use_in_one_line(monkeypatch, capsys, tmp_path, device, gpus, mps,
                                                                  message):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    scripts = [(train.main, []), (evaluate.main, ["ckpt.pt"]), (segment.main, ["ckpt.pt"]),
               (analyze.main, ["ckpt.pt"]), (benchmark.main, [])]
    for main, argv in scripts:
        with pytest.raises(SystemExit) as stopped:
            main(argv + ["--device", device])
        err = capsys.readouterr().err.strip().splitlines()
        assert stopped.value.code == 2 and err[-1].endswith(f"argument --device: {message}"), (main, err)


def test_mps_is_taken_where_pytorch_has_it_and_runs_in_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert settings.device_argument("mps") == "mps"          # no MPS here to run on: the parse and the precision
    assert settings.auto_precision(torch.device("mps"), "resnet18", "cifar", 16) == "fp32"
    assert settings.features_precision(torch.device("mps"), torch.nn.Linear(1, 1)).autocast.__class__.__name__ \
        == "nullcontext"


# ---- no believable number from a broken input

def test_features_that_are_not_finite_are_refused_naming_the_checkpoint(tmp_path):
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "0"])
    path = tmp_path / "run" / "ckpt.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["backbone.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    for main, extra in ((evaluate.main, []), (analyze.main, ["--out", str(tmp_path / "analysis")])):
        with pytest.raises(SystemExit, match=r"^error: .*nan.pt gives features that are not finite \(NaN or inf\) for "
                                             r"\d+ of \d+ images: its weights are broken"):
            main([str(tmp_path / "nan.pt"), "--workers", "0", *extra])
    assert not (tmp_path / "run" / "eval.jsonl").exists()
    write_voc(tmp_path / "VOCdevkit" / "VOC2012", ["t0", "t1"], ["v0"])
    with pytest.raises(SystemExit, match=r"^error: .*nan.pt: the backbone's features are not finite"):
        segment.main([str(tmp_path / "nan.pt"), "--workers", "0", "--data-dir", str(tmp_path), "--image-size", "32",
                      "--out", str(tmp_path / "seg"), "--pca-images", "0"])


def test_segment_refuses_masks_that_are_all_void(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc(voc, ["t0", "t1"], ["v0", "v1"])
    for name in ("v0", "v1"):
        mask = Image.open(voc / "SegmentationClass" / f"{name}.png")
        mask.point(lambda value: 255).save(voc / "SegmentationClass" / f"{name}.png")      # every pixel void
    torch.save(train_backbone_state(), tmp_path / "backbone.pth")
    with pytest.raises(SystemExit, match=r"^error: every pixel of the 2 masks in .*val.txt is void \(255\): there is "
                                         r"nothing to train or score"):
        segment.main([str(tmp_path / "backbone.pth"), "--data-dir", str(tmp_path), "--image-size", "32",
                      "--workers", "0", "--out", str(tmp_path / "seg")])
    assert not (tmp_path / "seg").exists()


def train_backbone_state():
    import models
    return models.build_backbone("resnet18", 32, width=8).state_dict()


def test_a_kappa_below_the_float32_bound_is_refused_and_the_bound_is_where_the_loss_goes_blind(tmp_path):
    z = torch.nn.functional.normalize(torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(0)), dim=-1)
    bound = 2.0 ** -24 * math.log(8 * 16)
    assert settings.kappa_is_resolvable(bound * 1.01, 8 * 16)[0] and not settings.kappa_is_resolvable(bound, 128)[0]
    rows = {}
    for factor in (0.25, 16):                  # the per-row log-mean-exps over the batch, in float32
        kappa = bound * factor
        masked = (kappa * z.reshape(-1, 32) @ z.reshape(-1, 32).T).fill_diagonal_(-math.inf)
        rows[factor] = torch.logsumexp(masked, dim=1)
        assert hydes.hydes_loss(z, kappa)["loss"].item() == 0.0 or factor > 1
    assert rows[0.25].unique().numel() == 1 and rows[16].unique().numel() > 1    # blind below, sees above
    with pytest.raises(SystemExit, match=r"--kappa 1e-09 is too small: the kernel exp\(kappa s\) cannot tell two "
                                         r"points apart in float32 .* unless kappa > 2\.1e-07\)"):
        train.main(tiny_run(tmp_path) + ["--kappa", "1e-9", "--out", str(tmp_path / "run")])   # N = 4 views x 8


@pytest.mark.parametrize("extra, message", [
    (["--global-size", "0"], "crops of 0 and 16 px are too small"),
    (["--local-size", "0"], "crops of 32 and 0 px are too small"),
    (["--global-size", "16", "--local-size", "32"], "--local-size 32 is larger than --global-size 16")])
def test_crop_sizes_of_zero_or_local_above_global_are_refused(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "run"), "--epochs", "1", *extra])
    assert not (tmp_path / "run").exists()


def test_a_single_class_is_refused_by_the_monitor_and_top5_needs_more_than_5_classes(tmp_path, capsys):
    for split in ("train", "test"):
        write_images(tmp_path / "one" / split / "a", 8)
    argv = tiny_run(tmp_path) + ["--data-dir", str(tmp_path / "one"), "--out", str(tmp_path / "run"), "--epochs", "1"]
    with pytest.raises(SystemExit, match=r"the online evaluation \(--eval-every\) scores folder's classes, and its test "
                                         r"split has 1; a probe needs at least 2"):
        train.main(argv + ["--eval-every", "1"])
    labels = torch.arange(6).repeat(10)
    feats = torch.eye(6)[labels] + 0.1 * torch.randn(60, 6, generator=torch.Generator().manual_seed(0))
    for classes in (5, 6):                                   # top-5 is 100 by construction with 5 classes
        keep = labels < classes
        knn = evaluate.knn_accuracy(feats[keep], labels[keep], feats[keep], labels[keep], k=5)
        logits = evaluate.topk_accuracy(feats[keep][:, :classes], labels[keep])
        assert (knn[1] is None, logits[1] is None) == (classes == 5, classes == 5)
    train.main(tiny_run(tmp_path) + ["--out", str(tmp_path / "two"), "--epochs", "0"])
    result = evaluate.main([str(tmp_path / "two" / "ckpt.pt"), "--workers", "0", "--probe", "knn", "--knn-k", "3"])
    assert result["knn_top5"] is None and "note: top-5 is left out" in capsys.readouterr().out


# ---- data that vanishes is named

def test_gif_files_are_read_other_files_named_and_a_broken_class_link_refused(tmp_path, capsys):
    root = tmp_path / "images"
    tiny_run(tmp_path)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "train" / "a" / "100.gif")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    import data
    split = data.dataset_split("folder", str(root), "train", None)
    assert len(split) == 17 and any(path.endswith("100.gif") for path, _ in split.samples)
    assert "holds 1 file(s) that are not images PIL reads, left out: " in capsys.readouterr().out
    os.symlink(tmp_path / "gone", root / "train" / "c")
    with pytest.raises(data.DatasetError, match=r"the class folder .*train.c is a symbolic link to .*gone, which does "
                                                r"not exist \(1 such link\(s\)\); mount or fix it"):
        data.dataset_split("folder", str(root), "train", None)


def test_the_printed_resume_command_can_be_pasted_with_any_folder_name():
    control = types_namespace(signalled=True, received=15, main_process=True, world_size=1,
                              checkpoint="my run (test)/ckpt.pt", args=types_namespace(out="my run (test)"),
                              barrier=lambda: None)
    import runs
    import io
    import contextlib
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
        runs.RunControl.stop_after_save(control, 2)
    command = printed.getvalue().strip().splitlines()[-1]
    assert shlex.split(command) == ["python", "train.py", "--out", "my run (test)", "--resume"]


def types_namespace(**kwargs):
    import types
    return types.SimpleNamespace(**kwargs)


def test_a_dead_peer_is_told_apart_from_other_runtime_errors():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4823: Connection reset by peer.")
    assert train.peer_is_gone(gloo) and not train.peer_is_gone(RuntimeError("CUDA out of memory"))
    assert np.isfinite(1.0)


def test_torchrun_with_a_process_killed_ends_in_one_line_from_rank_0(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(train.__file__), *tiny_run(tmp_path), "--out", str(out), "--epochs", "1000",
               "--device", "cpu"]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() and time.time() < deadline:       # an epoch is saved
            time.sleep(0.2)
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):   # torchrun's child with RANK=1
            try:
                parent = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
                if parent == launcher.pid and b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read():
                    os.kill(pid, signal.SIGKILL)
            except OSError:                   # a process that ended meanwhile
                continue
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: rank 1 of the 2 training processes stopped (killed?), so rank 0 cannot go on; "
                    f"{out / 'ckpt.pt'} holds the last epoch saved: continue with --resume"], stderr[-3000:]
    assert "[rank0]" not in stderr and torch.load(out / "ckpt.pt", weights_only=True)["step"] >= 2


def test_the_pca_picture_leaves_out_stages_of_one_pixel_and_says_why_there_is_none():
    g = torch.Generator().manual_seed(0)
    stages = [torch.randn(8, 4, 4, generator=g), torch.randn(16, 2, 2, generator=g), torch.randn(32, 1, 1, generator=g)]
    picture = segment.pca_picture(stages, (32, 32))          # an ImageNet-stem ResNet's last stage at 32 px: 1 x 1
    assert picture.shape == (3, 32, 32) and torch.isfinite(picture).all()
    assert torch.equal(picture, segment.pca_picture(stages[:2], (32, 32)))
    with pytest.raises(ValueError, match="every stage of the backbone is 1 x 1 px at this --image-size"):
        segment.pca_picture(stages[2:], (32, 32))
