import torch

import mat_cuda


def test_build_info_keys():
    info = mat_cuda.build_info()
    assert set(info) >= {"cuda", "cuda_arch_list", "cuda_version", "torch_version", "openmp",
                         "torch_runtime_version"}
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_arch_list"]
    assert info["torch_runtime_version"] == torch.__version__

