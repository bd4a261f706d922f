"""The CUDA kernel robe_dist gives FBGEMM's complete cumsum where fbgemm-gpu-cpu has none."""

import pytest
import torch

import robe_dist.ops  # noqa: F401  (installs it)
from robe_dist import fbgemm_compat


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 5), (2, 0)])
def test_complete_cumsum_equals_fbgemms(dtype, shape):
    t = torch.randint(0, 9, shape, dtype=dtype)
    ours = fbgemm_compat.complete_cumsum(t)
    theirs = torch.ops.fbgemm.asynchronous_complete_cumsum(t)  # FBGEMM's CPU kernel
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_the_op_has_a_cuda_kernel_once_robe_dist_is_imported():
    """With fbgemm-gpu-cpu (CI, the lent GPU image) robe_dist registers it; with the CUDA build
    FBGEMM's own is there. Either way a lengths-only KJT on CUDA can compute its offsets."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(fbgemm_compat.COMPLETE_CUMSUM, "CUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kjt_offsets_on_cuda():
    from torchrec import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.arange(6), lengths=torch.tensor([2, 0, 1, 3])).to("cuda")
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 6]
