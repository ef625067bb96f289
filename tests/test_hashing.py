import os
import subprocess
import sys

import torch

from recsys import hashing
from recsys.hashing import hash_row_reference, hash_rows, mix64, mixed_salt
from features.ids import string_to_id

EDGE_VALUES = [0, 1, 42, 943, -5, 2**62, 2**63 - 1, -(2**63)]


def test_mix64_is_canonical_splitmix64():
    # splitmix64 seeded with 0, 1 and 2**64-1: the published first outputs
    assert mix64(torch.tensor([0, 1, -1])).tolist() == [
        -2152535657050944081, -7995527694508729151, -1956407806741107680]
    assert (-2152535657050944081) % 2**64 == 0xE220A8397B1DCDAF


def test_golden_rows():
    rows = hash_rows(torch.tensor(EDGE_VALUES), mixed_salt("user_id", 0), 1_000_003).tolist()
    assert rows == [467024, 60691, 39424, 749467, 470500, 414693, 494878, 507520]
    rows = hash_rows(torch.tensor(EDGE_VALUES), mixed_salt("item_id", 1), 5400).tolist()
    assert rows == [715, 723, 1433, 5247, 2197, 4563, 288, 3416]


def test_golden_string_ids_and_salts():
    assert string_to_id("M") == 3414854746119481784
    assert string_to_id("F") == 3414849248561340729
    assert string_to_id("engineer") == 731184025908612728
    assert string_to_id("Comédie") == 4161645831610647732
    assert mixed_salt("user_id", 0) == 6244742006134277539
    assert hashing.HASH_NAME == "splitmix64-salted" and hashing.HASH_VERSION == 1


def test_tensor_hash_matches_python_reference():
    values = torch.randint(-(2**63), 2**63 - 1, (2000,), generator=torch.Generator().manual_seed(1))
    for feature, probe, num_rows in [("user_id", 0, 97), ("genres", 3, 5400), ("zip_prefix", 1, 10**7)]:
        got = hash_rows(values, mixed_salt(feature, probe), num_rows).tolist()
        want = [hash_row_reference(int(v), feature, probe, num_rows) for v in values]
        assert got == want
        assert min(got) >= 0 and max(got) < num_rows


def test_probes_and_features_use_different_rows():
    values = torch.arange(1000)
    a = hash_rows(values, mixed_salt("user_id", 0), 100_000)
    b = hash_rows(values, mixed_salt("user_id", 1), 100_000)
    c = hash_rows(values, mixed_salt("item_id", 0), 100_000)
    assert (a == b).float().mean() < 0.01 and (a == c).float().mean() < 0.01


def test_rows_spread_evenly():
    rows = hash_rows(torch.arange(200_000), mixed_salt("item_id", 0), 100)
    counts = torch.bincount(rows, minlength=100).float()
    assert counts.min() > 1700 and counts.max() < 2300  # 2000 expected per row


def test_same_rows_in_another_process_with_another_hash_seed():
    code = ("from recsys.hashing import *; from features.ids import string_to_id; import torch; "
            "print(hash_rows(torch.arange(50), mixed_salt('gender', 0), 1009).tolist(), string_to_id('M'))")
    here = hash_rows(torch.arange(50), mixed_salt("gender", 0), 1009).tolist()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{here} {string_to_id('M')}"


def test_a_tensor_of_salts_hashes_many_keys_in_one_call():
    """Per-value salts and broadcast [n, 1] x [1, probes] salts give what one call per salt gives."""
    values = torch.tensor(EDGE_VALUES)
    salts = [mixed_salt("item_id", p) for p in range(3)]
    one_by_one = torch.stack([hash_rows(values, salt, 5400) for salt in salts], dim=1)
    broadcast = hash_rows(values.unsqueeze(1), torch.tensor(salts).unsqueeze(0), 5400)
    per_value = hash_rows(values.repeat(3), torch.tensor(salts).repeat_interleave(len(values)), 5400)
    assert torch.equal(broadcast, one_by_one)
    assert torch.equal(per_value, one_by_one.T.flatten())
    assert broadcast[:, 1].tolist() == [715, 723, 1433, 5247, 2197, 4563, 288, 3416]  # the golden item_id#1 rows


def test_hashing_leaves_its_input_alone():
    values = torch.tensor(EDGE_VALUES)
    mix64(values), hash_rows(values, mixed_salt("user_id", 0), 97)
    assert values.tolist() == EDGE_VALUES


def test_the_python_int_hash_gives_the_tensor_hashs_rows():
    values = [0, 1, -1, 2**62, -(2**63), 2**63 - 1, 123456789, -987654321]
    for feature, probe, num_rows in (("item_id", 0, 5400), ("genres", 1, 7), ("user_id", 3, 2**31 - 1)):
        salt = hashing.mixed_salt(feature, probe)
        rows = hashing.hash_rows(torch.tensor(values), salt, num_rows).tolist()
        assert [hashing.hash_row(v, salt, num_rows) for v in values] == rows
        assert rows == [hashing.hash_row_reference(v, feature, probe, num_rows) for v in values]
