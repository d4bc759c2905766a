import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE = REPO / "code"
if str(CODE) not in sys.path:
    sys.path.insert(0, str(CODE))


# Tiny synthetic data roots shared by the data, evaluation and command-line tests. They are built once per
# session and must not be changed: a test that damages files works on a copy (shutil.copytree).

@pytest.fixture(scope="session")
def syn_la(tmp_path_factory):
    """LA root: 5 training and 2 test cases, about 36 x 36 x 24 (x and y jittered by up to 10 %)."""
    from utils.synthetic import make_la
    return make_la(tmp_path_factory.mktemp("syn_la"), n_train=5, n_test=2, shape=(36, 36, 24), seed=0)


@pytest.fixture(scope="session")
def syn_acdc(tmp_path_factory):
    """ACDC root: 3 training patients (6 volumes, 36 slices: enough for --labelnum 1 = 32 labeled slices),
    1 validation and 1 test patient; volumes about 6 x 48 x 48."""
    from utils.synthetic import make_acdc
    return make_acdc(tmp_path_factory.mktemp("syn_acdc"), n_train_patients=3, n_val=1, n_test=1,
                     shape=(6, 48, 48), seed=0)


@pytest.fixture
def one_thread():
    """In-process runs compute with one intra-op thread, like the subprocesses (OMP_NUM_THREADS=1): results do
    not depend on the machine's core count, and on a shared 2-core machine two OpenMP threads can wait on each
    other for seconds."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
