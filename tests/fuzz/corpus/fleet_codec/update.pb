
n1ýgateway1.2.3"˜{
  "module": "gateway",
  "version": "1.2.3-rc.1+b7",
  "target": "x86_64",
  "sha256": "34a04005bcaf206eec990bd9637d9fdb6725e0a0c0d4aebf003f17f4c956eb5c",
  "size": 6,
  "run": {
    "args": [
      "--port",
      "8080"
    ],
    "env": {
      "RUST_LOG": "info"
    },
    "listen": "127.0.0.1:8080",
    "ready_timeout": "5s",
    "log_patterns": [
      "ERROR"
    ],
    "probe": [
      {
        "http": "http://127.0.0.1:8080/healthz",
        "interval": "1s"
      }
    ],
    "overlay_env": [
      "APP_*"
    ]
  }
}*@2ˆ@9141107b6ed1422839ed97f4674de82ae742ec2f8556c3df948da06930f94393x"@148de9c5a7a44d19e56cd9ae1a554bf67847afb0c58f6e12fa29ac7ddfca9940:t-1