# The environment every command on a lent GPU machine needs; sourced by gpu_check.sh and
# gpu_ab.sh (`source scripts/gpu_env.sh`).
#
# NVLink multicast stays off (HARDWARE.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The lent machines' image sets CC/CXX to /opt/gcc, whose g++ puts a second copy of libstdc++'s
# stream code into the extension: formatting any error message with a number (c10::str) then
# segfaults (seen 2026-11-22: every TORCH_CHECK failure of ours crashed the process). The
# system compiler (the one torch's libstdc++ comes with) builds an extension that raises.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi
