"""The format registry is the one place a data format is named: every registered format can be synthesized,
opened and read back in-process through its own module; pack targets can be packed into; bad names are clear
errors; importing the registry is cheap."""

from __future__ import annotations

import collections
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_service.data import FORMATS, formats, open_source
from mae_service.data.decode import center_crop
from mae_service.data.pack import pack
from mae_service.data.synth import CLASSES, make_item, synthesize

DATA_DIR = Path(formats.__file__).parents[1]
N, SIZE, NUM_CLASSES, SEED = 11, 16, 3, 2


def expected_items() -> collections.Counter:
    """(sha1 of the bytes, class name) of every image ``synthesize`` writes with these settings."""
    names = CLASSES[:NUM_CLASSES]
    return collections.Counter(
        (hashlib.sha1(make_item(i, i % NUM_CLASSES, SIZE, SEED, names)[0]).hexdigest(), names[i % NUM_CLASSES])
        for i in range(N)
    )


def read_back(src) -> collections.Counter:
    """Every item of ``src``, read through its format's reader in this process (both ``iter`` and ``get``)."""
    fs, _ = src.filesystem()
    fmt = formats.get(src.fmt)
    seen: collections.Counter = collections.Counter()
    for shard in src.shards:
        reader = fmt.reader(src, fs, shard)
        items = [f.result() for f in reader.iter(np.arange(shard.count))]
        assert items == [reader.get(p) for p in range(shard.count)]
        assert all(reader.name(p) for p in range(shard.count))
        for data, label in items:
            assert center_crop(data, 8).shape == (3, 8, 8)
            seen[hashlib.sha1(data).hexdigest(), src.class_names[label]] += 1
    return seen


@pytest.mark.parametrize("name", formats.NAMES)
def test_every_format_is_synthesized_opened_and_read_back(tmp_path, name):
    synthesize(str(tmp_path), num_images=N, image_size=SIZE, classes=NUM_CLASSES, fmt=name, seed=SEED, shard_size=4)
    src = open_source(str(tmp_path), name, shard_size=4)
    assert src.fmt == name and src.num_images == N and src.class_names == sorted(CLASSES[:NUM_CLASSES])
    assert [s.count for s in src.shards] == [4, 4, 3]
    assert read_back(src) == expected_items()  # the same bytes and labels, whatever the format


@pytest.mark.parametrize("name", formats.PACK_TARGETS)
def test_every_pack_target_is_packed_from_a_folder(tmp_path, name):
    synthesize(str(tmp_path / "img"), num_images=N, image_size=SIZE, classes=NUM_CLASSES, seed=SEED)
    assert pack(str(tmp_path / "img"), str(tmp_path / name), fmt=name, shard_size=5) == N
    src = open_source(str(tmp_path / name), name)
    assert [s.count for s in src.shards] == [5, 5, 1] and read_back(src) == expected_items()


def test_registry_names_and_errors():
    assert FORMATS == formats.NAMES and len(set(formats.NAMES)) == len(formats.NAMES) >= 3
    assert formats.PACK_TARGETS == tuple(n for n in formats.NAMES if formats.get(n).pack_target)
    assert formats.FOLDER in formats.NAMES and formats.FOLDER not in formats.PACK_TARGETS
    assert all(formats.get(n).name == n and formats.get(n).summary for n in formats.NAMES)
    with pytest.raises(ValueError, match=rf"^data format 'nope': allowed {', '.join(formats.NAMES)}$"):
        formats.get("nope")
    assert ", ".join(formats.NAMES).startswith("files, wds, parquet")  # the order users see
    with pytest.raises(ValueError, match=rf"^--format='files': allowed {', '.join(formats.PACK_TARGETS)}$"):
        formats.get(formats.FOLDER, pack_target=True, what="--format='files'")


@pytest.mark.parametrize("name", formats.NAMES)
def test_each_format_is_one_module_with_the_three_functions(name):
    module = formats.get(name).module()
    assert Path(module.__file__ or "") == DATA_DIR / "formats" / f"{name}.py"
    for fn in ("open_dataset", "reader", "writer"):
        assert callable(getattr(module, fn))


def test_no_other_data_module_names_a_format():
    """Outside data/formats/ the modules go through the registry: no quoted format names, no per-format tuples."""
    pattern = re.compile("|".join(rf"""["']{re.escape(n)}["']""" for n in formats.NAMES))
    offenders = [
        f"{p.name}:{i}"
        for p in sorted(DATA_DIR.glob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_importing_the_registry_is_cheap():
    code = (
        "import sys\nfrom mae_service.data.formats import NAMES\n"
        "heavy = ('numpy', 'pyarrow', 'PIL', 'torch', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "from mae_service.data import formats\n"
        "[formats.get(n).module() for n in NAMES]\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "[]"]


def test_a_dataset_is_announced_once_per_process(tmp_path, caplog):
    """The demo and ``eval report`` open the same folders for every row: "opened …" is said the first time only."""
    import logging

    from mae_service.data.source import open_source
    from mae_service.data.synth import synthesize

    synthesize(str(tmp_path / "d"), num_images=6, image_size=16, classes=2, fmt="files", seed=0)
    with caplog.at_level(logging.DEBUG, logger="mae_service.data.source"):
        for _ in range(3):
            open_source(str(tmp_path / "d"), "files")
    levels = [r.levelno for r in caplog.records if r.getMessage().startswith("opened ")]
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG]
