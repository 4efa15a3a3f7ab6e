"""Prints the CMake arguments that let find_package(Torch) configure against this environment's
torch. A CUDA build of torch makes its CMake config look for the CUDA toolkit and NVRTC even for a
CPU-only consumer; a toolkit without NVRTC (torch's pip wheels bring it as nvidia-* packages)
needs both pointed at explicitly."""

import glob
import os
import shlex

import torch
import torch.utils

args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
if torch.version.cuda:
    from torch.utils.cpp_extension import CUDA_HOME

    root = os.environ.get("CUDA_HOME") or CUDA_HOME or "/usr/local/cuda"
    if os.path.exists("/usr/local/cuda/lib64") and not os.path.exists(os.path.join(root, "lib64")):
        root = "/usr/local/cuda"
    args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={root}")
    site = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*"))
                   + glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
print(" ".join(shlex.quote(a) for a in args))
