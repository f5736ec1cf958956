# Sourced by bench/run_gpu*.sh on the GPU machine, which has neither uv nor ray. `gpu_env
# [WHEEL ...]` unpacks ray (.whl/site.tar.xz, from ../shared/device/pack-wheels.sh) into
# /tmp/site, installs the wheels given beside it, and sets what every process there needs
# (NVLink multicast off, as ../shared/device/README.md asks; no uv runtime environments).
# A function, so the wheels are its own arguments, never the calling script's. `step` runs one
# step of a script with a time limit, logged to $OUT/NAME.log, and stops any Ray cluster it left.
gpu_env() {
  mkdir -p /tmp/site && tar -xJf .whl/site.tar.xz -C /tmp/site || exit 1
  if [ $# -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$@" || exit 1
  fi
  _gpu_exports
}

# `gpu_env_sglang`: the same for an SGLang run, from .gpu/site.tar.xz (bench/pack_sglang_run.sh:
# ray, sglang 0.5.17, megatron-core and math-verify in one archive). The bundle leaves out
# flashinfer's kernels, so SGLang is told not to pick them.
gpu_env_sglang() {
  mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site || exit 1
  tar -xJf .gpu/testing.tar.xz -C /tmp/site || exit 1  # pytest + xdist, as uv.lock has them
  _gpu_exports
  export SGLANG_IS_FLASHINFER_AVAILABLE=false
}

_gpu_exports() {
  export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 \
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    PYTHONUNBUFFERED=1
  # The machine sets PYTHONDONTWRITEBYTECODE and its torch ships no bytecode, so every process
  # (driver, Ray actor, torchrun rank) compiled torch and transformers from source again. Let
  # the first importer write the bytecode, into a folder of our own (the installed packages'
  # folders need not be writable); later processes load it.
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=/tmp/pycache
}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $* (limit ${limit}s)" | tee -a "$OUT/$name.log"
  timeout -k 10 "$limit" "$@" 2>&1 | grep -v -i -e warn -e deprecat | tee -a "$OUT/$name.log"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
  # a timed-out step must not leave its cluster behind (the device machine is ours alone)
  python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
}
