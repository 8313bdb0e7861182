import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_and_tokenizer():
    """A tiny random model (eval mode) and a 512-token tokenizer trained on the synthetic corpus."""
    from helpers import corpus_text

    from nanoseek.config import preset
    from nanoseek.model import NanoSeek
    from nanoseek.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(iter([corpus_text()]), vocab_size=512)
    return NanoSeek(preset("tiny", vocab_size=512)).eval(), tok


@pytest.fixture(scope="session")
def compiler():
    """Tests of compiled decoding need the C++ compiler torch.compile builds CPU kernels with (without one the
    engine decodes eagerly, which other tests cover)."""
    import os
    import shutil

    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler for torch.compile (set CXX or install g++)")
