#!/usr/bin/env bash
# Builds what the GPU machine lacks for a Sluice run on a real SGLang server, as ONE archive
# that fits the 64 MiB a device call carries: .gpu/site.tar.xz (about 58 MiB) holds ray 2.60,
# sglang 0.5.17 with the kernels and libraries its triton/pytorch backends load, sglang's pinned
# transformers and tokenizers, math-verify (the built-in task's reward) and megatron-core
# 0.19.2, unpacked into one site tree.
#   usage, from the repository root:   bench/pack_sglang_run.sh [--testing-only]
#   then carry .gpu and begin the device command with
#     source bench/gpu_env.sh && gpu_env_sglang
#   env: WHEELS=/tmp/sluice-gpu-wheels   where wheels are downloaded once and reused
#
# Why sglang 0.5.17 and not the pinned 0.5.23: the GPU machine's torch is 2.11.0, the one
# sglang 0.5.16-0.5.17 pin; 0.5.18 and later pin torch 2.13+, which cannot be carried there
# (docs/sglang.md, "Versions").
#
# What is left out, and why the run does not miss it (--attention-backend triton
# --sampling-backend pytorch --grammar-backend none, SGLANG_IS_FLASHINFER_AVAILABLE=false):
#   sgl_kernel: flash_ops (FlashAttention-3, 1.1 GB; only the fa3 backend loads it), sm100/
#     (loaded on compute capability 10 only), flashmla_ops (MLA models; its import is guarded),
#     infllm_ops (a CPython 3.10 build, unloadable on 3.12 anyway);
#   flashinfer/data: cutlass examples/python/tests and cccl's python (flashinfer's JIT, which
#     builds sgl_kernel's RMSNorm with the machine's nvcc, reads only the headers and csrc);
#   sglang's Rust extensions (Rust server, native gRPC, inkling preprocessing: other flags);
#   sglang.multimodal_gen (diffusion serving, `sglang generate`);
#   xgrammar's static library; jedi and parso (IPython imports them lazily, for completion);
#   zstandard's cffi backend (the C backend is the one loaded);
#   ray: the Java jars, the dashboard's web build, rllib/tune/serve/llm/workflow/data/train
#     (Sluice uses none); ray's binaries are stripped of debug symbols.
# Everything else is as the wheels have it.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cache=${WHEELS:-/tmp/sluice-gpu-wheels}
out=$root/.gpu
mkdir -p "$cache" "$out"

# The machine is not known to have pytest-xdist, which pyproject's addopts (-n, --dist) need:
# the test runner, at the versions uv.lock pins, goes in a small archive of its own
# (.gpu/testing.tar.xz, about 1 MiB), taken from the project's own environment.
site_packages=$("$root/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
(cd "$site_packages" && tar -cf - --exclude=__pycache__ _pytest pytest py.py pluggy iniconfig \
  xdist execnet pytest_timeout.py pytest-*.dist-info pytest_*.dist-info pluggy-*.dist-info \
  iniconfig-*.dist-info execnet-*.dist-info) | xz -9 > "$out/testing.tar.xz"
echo "$out/testing.tar.xz: $(du -k "$out/testing.tar.xz" | cut -f1) KiB"
[ "${1:-}" = --testing-only ] && exit 0

SGLANG=(
  sglang==0.5.17 sglang-kernel==0.4.5 flashinfer-python==0.6.15.post1 apache-tvm-ffi==0.1.11
  xgrammar==0.2.1 torch-memory-saver==0.0.10 transformers==5.12.1 tokenizers==0.22.2
  fastapi==0.140.13 starlette==0.52.1 uvicorn==0.55.0 python-multipart==0.0.34
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 orjson==3.13.0 pyzmq==27.3.0 msgspec==0.23.0 pybase64==1.5.1
  setproctitle==1.3.8 partial-json-parser==0.2.1.1.post7 zstandard==0.25.0 openai==2.6.1
  jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
  dill==0.4.1 gguf==0.19.0 compressed-tensors==0.20.1 loguru==0.8.0 ipython==9.19.1
  ipython-pygments-lexers==1.1.1 decorator==5.3.2 matplotlib-inline==0.2.2 pexpect==4.9.0
  ptyprocess==0.7.0 prompt-toolkit==3.0.53 wcwidth==0.9.5 stack-data==0.6.3 asttokens==3.0.2
  executing==2.3.0 pure-eval==0.2.4 traitlets==5.16.1
)
RAY=(
  ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1
)
SLUICE=(
  megatron-core==0.19.2 math-verify==0.9.0 latex2sympy2-extended==1.11.0
  antlr4-python3-runtime==4.13.2
)

wheel_of() {  # the cached wheel file of NAME==VERSION, if any
  local name=${1%%==*} version=${1#*==}
  name=${name//-/_}
  ls "$cache/${name}-${version}-"*.whl "$cache/${name,,}-${version}-"*.whl 2>/dev/null | head -1
}
missing=()
for spec in "${SGLANG[@]}" "${RAY[@]}" "${SLUICE[@]}"; do
  [ -n "$(wheel_of "$spec")" ] || missing+=("$spec")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "downloading ${#missing[@]} wheels into $cache (sglang-kernel alone is 383 MB)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$cache" "${missing[@]}" 2>&1 | grep -v "is ignored: it is neither" || true
fi

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for spec in "${SGLANG[@]}" "${RAY[@]}" "${SLUICE[@]}"; do
  wheel=$(wheel_of "$spec")
  [ -n "$wheel" ] || { echo "no wheel for $spec in $cache" >&2; exit 1; }
  case $spec in
    sglang-kernel==*) skip=('sgl_kernel/flash_ops.abi3.so' 'sgl_kernel/sm100/*'
      'sgl_kernel/flashmla_ops.abi3.so' 'sgl_kernel/infllm_ops.*.so') ;;
    flashinfer-python==*) skip=('flashinfer/data/cutlass/examples/*'
      'flashinfer/data/cutlass/python/*' 'flashinfer/data/cutlass/test/*'
      'flashinfer/data/cccl/python/*') ;;
    xgrammar==*) skip=('xgrammar/lib/*') ;;
    zstandard==*) skip=('zstandard/_cffi.*.so') ;;
    ray==*) skip=('ray/jars/*' 'ray/dashboard/client/build/*' 'ray/rllib/*' 'ray/tune/*'
      'ray/serve/*' 'ray/llm/*' 'ray/workflow/*' 'ray/data/*' 'ray/train/*') ;;
    *) skip=() ;;
  esac
  # unzip keeps the executable bits of ray's gcs_server and raylet
  (cd "$site" && unzip -q -o "$wheel" ${skip[@]+-x "${skip[@]}"})
done
rm -f "$site"/sglang/srt/{server,grpc,multimodal}/_core.*.so
rm -rf "$site"/sglang/multimodal_gen
rm -f "$site"/torch_memory_saver_hook_mode_*_cu12.abi3.so  # the machine's torch is cu13
strip --strip-debug "$site"/xgrammar/libxgrammar_bindings.so "$site"/ray/_raylet.so \
  "$site"/ray/core/src/ray/gcs/gcs_server "$site"/ray/core/src/ray/raylet/raylet
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
tar -C "$site" -cf - . | xz -9 -T0 > "$out/site.tar.xz"
echo "$out/site.tar.xz: $(du -m "$out/site.tar.xz" | cut -f1) MiB ($(du -sm "$site" | cut -f1) MiB unpacked)"
