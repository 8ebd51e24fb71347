"""scripts/clusters.py's image cues, against values worked out by hand, and its cluster ids."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("clusters", os.path.join(ROOT, "scripts", "clusters.py"))
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)


def test_cues_of_a_flat_colour_and_of_stripes():
    flat = np.empty((1, 16, 16, 3), np.float32)
    flat[:] = [0.9, 0.1, 0.6]  # 4 levels per channel: (3, 0, 2) -> bin 3*16 + 0*4 + 2 = 50
    stripes = np.zeros((1, 16, 16, 3), np.float32)
    stripes[:, :, (np.arange(16) // 2) % 2 == 0] = 1.0  # vertical stripes 2 px wide: horizontal gradients only
    f = C.chunk_cues(np.concatenate([flat, stripes]))
    np.testing.assert_allclose(f["mean colour"][0], [0.9, 0.1, 0.6], atol=1e-5)
    assert f["colour histogram"][0, 50] == 1 and f["colour histogram"][0].sum() == 1
    np.testing.assert_allclose(f["brightness, contrast"][0], [0.299 * 0.9 + 0.587 * 0.1 + 0.114 * 0.6, 0], atol=1e-5)
    assert f["edges (strength, orientation)"][0].max() == 0  # no edge anywhere
    e = f["edges (strength, orientation)"][1]
    assert e[0] > 0 and abs(e[1] - 1) < 1e-9 and e[2:].sum() == 0  # strength, then all weight in orientation bin 0
    assert abs(f["layout (8x8 grey)"]).sum(1)[0] < 1e-6  # a flat image has a flat (zero-mean) thumbnail


def test_cues_by_chunks_equal_cues_at_once():
    """cues() converts uint8 images a chunk at a time (memory): the same descriptors as all images at once."""
    images = np.random.default_rng(0).integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    whole = C.chunk_cues(images.astype(np.float32) / 255)
    chunked = C.cues(images, chunk=3)  # chunks of 3, 3 and 1 images
    assert whole.keys() == chunked.keys()
    for name in whole:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_cluster_ids_are_one_per_super_sub_pair(tmp_path):
    sup = np.array([0, 0, 1, 1, 2, 2])
    sub = np.array([0, 1, 0, 1, 0, 0])
    np.savez(tmp_path / "c.npz", super=sup, sub=sub)
    ids = C.cluster_ids(tmp_path / "c.npz")
    pairs = {(a, b) for a, b in zip(sup, sub)}
    assert len(np.unique(ids)) == len(pairs) == 5 and ids[4] == ids[5]
