"""rgb_to_label op against its reference, on every device; and the PNG codec round trip."""
import numpy as np
import pytest
import torch
from PIL import Image

import lusscore.ops as ops
from lusscore.data import (IGNORE_INDEX, decode_label_rgb, encode_label_rgb, read_label_png,
                           write_label_png)
from lusscore.reference import label_codec as ref
from lusscore.utils import LusscoreError
from conftest import cuda_usable, requires_cuda
from samples import rgb_label_image

requires_two_gpus = pytest.mark.skipif(
    not cuda_usable() or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs (cuda:1) and lusscore built with CUDA kernels")


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_to_label_matches_reference(device, channels):
    rgb = rgb_label_image(37, 53, channels=channels, max_id=65535, device=device)
    out = ops.rgb_to_label(rgb)
    assert out.dtype == torch.int64 and out.shape == (37, 53) and out.device == rgb.device
    assert torch.equal(out, ref.rgb_to_label(rgb))


def test_rgb_to_label_batched_noncontiguous_empty(device):
    rgb = rgb_label_image(20, 30, device=device)
    batch = torch.stack([rgb, rgb.flip(0)])
    noncontig = batch.transpose(1, 2)
    assert not noncontig.is_contiguous()
    assert torch.equal(ops.rgb_to_label(noncontig), ref.rgb_to_label(noncontig))
    empty = torch.zeros(0, 5, 3, dtype=torch.uint8, device=device)
    assert ops.rgb_to_label(empty).shape == (0, 5)


def test_rgb_to_label_errors(device):
    with pytest.raises(RuntimeError, match="dtype"):
        ops.rgb_to_label(torch.zeros(4, 4, 3, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="channel"):
        ops.rgb_to_label(torch.zeros(4, 4, 2, dtype=torch.uint8, device=device))


@requires_cuda
@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_to_label_cuda_grid_stride_past_one_grid(channels):
    """More pixels than one grid covers (capped_blocks: sms * 32 blocks of 256 threads)."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    n = 2 * sms * 32 * 256 + 1234
    rgb = rgb_label_image(n // 1000 + 1, 1000, channels=channels, max_id=65535, seed=3)
    assert rgb.shape[0] * rgb.shape[1] > sms * 32 * 256
    want = ops.rgb_to_label(rgb)
    assert torch.equal(want, ref.rgb_to_label(rgb))
    got = ops.rgb_to_label(rgb.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), want)


@requires_two_gpus
def test_rgb_to_label_non_default_device():
    """Input on cuda:1 while cuda:0 is current: the output lands on cuda:1, equal to the CPU's."""
    assert torch.cuda.current_device() == 0
    rgb = rgb_label_image(37, 53, channels=4, max_id=65535, seed=4)
    got = ops.rgb_to_label(rgb.to("cuda:1"))
    assert got.device == torch.device("cuda:1")
    assert torch.equal(got.cpu(), ops.rgb_to_label(rgb))
    assert torch.cuda.current_device() == 0


def test_rgb_to_label_opcheck(device):
    torch.library.opcheck(torch.ops.lusscore.rgb_to_label.default,
                          (rgb_label_image(8, 9, device=device),))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_rgb_to_label_compiles(device, backend):
    """aot_eager traces through the fake kernel; inductor also generates code around it."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x: ops.rgb_to_label(x) + 1, fullgraph=True, backend=backend)
    rgb = rgb_label_image(6, 7, device=device)
    assert torch.equal(fn(rgb), ref.rgb_to_label(rgb) + 1)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16])
def test_png_round_trip(tmp_path, dtype):
    label = np.array([[0, 1, 255, 256], [IGNORE_INDEX, 919, 65535, 4242]], dtype=dtype)
    path = tmp_path / "sub" / "x.png"
    write_label_png(path, label)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        rgb = np.asarray(im)
    assert tuple(rgb[1, 0]) == (232, 3, 0)  # ignore is stored as (232, 3, 0)
    assert (rgb[..., 2] == 0).all()
    back = read_label_png(path, dtype=dtype)
    assert back.dtype == dtype and np.array_equal(back, label)
    assert not list(path.parent.glob(".*tmp*")), "no temporary file may be left behind"


def test_png_round_trip_torch_and_large_random(tmp_path):
    label = torch.randint(0, 65536, (33, 47))
    write_label_png(tmp_path / "t.png", label)
    assert np.array_equal(read_label_png(tmp_path / "t.png"), label.numpy())
    assert np.array_equal(decode_label_rgb(encode_label_rgb(label.numpy())), label.numpy())


def test_png_errors_name_the_file(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gray)
    with pytest.raises(LusscoreError, match="gray.png.*grayscale/palette"):
        read_label_png(gray)
    pal = tmp_path / "pal.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).convert("P").save(pal)
    with pytest.raises(LusscoreError, match="pal.png.*'P'"):
        read_label_png(pal)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(LusscoreError, match="bad.png: cannot read"):
        read_label_png(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_label_png(tmp_path / "missing.png")
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([encode_label_rgb(np.ones((4, 4), np.int64)),
                               np.full((4, 4), 255, np.uint8)])).save(rgba)
    with pytest.raises(LusscoreError, match="rgba.png: label PNGs must be RGB.*'RGBA' \\(an alpha"):
        read_label_png(rgba)
    blue = encode_label_rgb(np.ones((4, 4), np.int64))
    blue[2, 3, 2] = 7
    Image.fromarray(blue).save(tmp_path / "blue.png")
    with pytest.raises(LusscoreError, match=r"blue.png: blue is 7 at \(row 2, column 3\)"):
        read_label_png(tmp_path / "blue.png")
    Image.fromarray(encode_label_rgb(np.ones((4, 4), np.int64))).save(tmp_path / "lossy.png", format="JPEG")
    with pytest.raises(LusscoreError, match="lossy.png: a JPEG file, not a PNG"):
        read_label_png(tmp_path / "lossy.png")
    ok = tmp_path / "ok.png"
    write_label_png(ok, np.zeros((4, 6), np.int64))
    with pytest.raises(LusscoreError, match="ok.png: label size 4x6.*5x6"):
        read_label_png(ok, expected_size=(5, 6))


def test_write_rejects_bad_ids_and_keeps_old_file(tmp_path):
    path = tmp_path / "keep.png"
    write_label_png(path, np.ones((3, 3), np.int64))
    before = path.read_bytes()
    with pytest.raises(LusscoreError, match="0..65535"):
        write_label_png(path, np.full((3, 3), 70000))
    with pytest.raises(LusscoreError, match="2-D"):
        write_label_png(path, np.zeros((3, 3, 3), np.int64))
    with pytest.raises(LusscoreError, match="integers"):
        write_label_png(path, np.zeros((3, 3), np.float32))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]
