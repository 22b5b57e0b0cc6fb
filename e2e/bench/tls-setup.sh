#!/usr/bin/env bash
# Shared by compare-tls.sh and h2.sh: a CA and a server certificate for 127.0.0.1 in $1, and an
# nginx peer that terminates TLS (HTTP/1.1 and HTTP/2) on 127.0.0.1:18444 and proxies /api/X to
# the harness upstream on 18080 over keep-alive, configured like the harness's plain peer.
set -euo pipefail
dir=$1
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
  -keyout "$dir/key.pem" -out "$dir/req.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > "$dir/ext.cnf"
openssl x509 -req -in "$dir/req.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -extfile "$dir/ext.cnf" -out "$dir/cert.pem" 2>/dev/null
cat > "$dir/nginx-tls.conf" <<CONF
worker_processes 1;
pid nginx-tls.pid;
error_log nginx-tls-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream up {
        server 127.0.0.1:18080;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:18444 ssl http2 backlog=4096;
        ssl_certificate $dir/cert.pem;
        ssl_certificate_key $dir/key.pem;
        location /api/ {
            proxy_pass http://up/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
