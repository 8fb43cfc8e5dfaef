# Call 6: the kernel-against-torch's-cast GPU test alone, with its errors printed (to set its bound).
export PYTHONPATH=$PWD; timeout 150 python -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu_fp8.py -k "kernel_as_with_torch"
