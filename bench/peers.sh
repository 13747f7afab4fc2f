# Sourced by the GPU scripts: puts the peer libraries (bitsandbytes) on PYTHONPATH, from
# BNB_PATH (a directory holding bitsandbytes/) or else from wheels in .whl/ (the device README's
# recipe: downloaded here, carried to the GPU machine), installed into /tmp/site.
if [ -n "${BNB_PATH:-}" ]; then
  export PYTHONPATH="$BNB_PATH${PYTHONPATH:+:$PYTHONPATH}"
elif ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
