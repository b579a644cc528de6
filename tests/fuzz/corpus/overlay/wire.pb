

--fast
RUST_LOGdebug
APP_MODEeu3s*

http://127.0.0.1:9/healthz