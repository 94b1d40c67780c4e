# The broker with SoftHSM2, as a production image (README, "Run in a container").
#
#   podman build --format docker --build-arg BASE_IMAGE=debian:bookworm-slim@sha256:<digest> \
#     -t credential-broker .   (docker format keeps the HEALTHCHECK)
#   podman run -d -v broker-data:/var/lib/broker -p 8443:8443 -p 8444:8444 -p 9464:9464 \
#     -e BROKER_SERVER_NAMES=broker.example.internal,localhost,127.0.0.1 credential-broker
#
# With no arguments it serves the embedded dev defaults (SQLite, a SoftHSM2 token) in the data
# volume; production runs mount a config file and pass `serve --config /etc/broker/broker.toml`.
#
# BASE_IMAGE is required and must be pinned by digest, NAME@sha256:<64 hex digits>:
#   --build-arg BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:<digest>
# (docs/production.md says how to read Debian's current digest and when to update it). A tag
# alone (debian:bookworm-slim) is refused by the first step below. tests/e2e/test_image.py
# builds on a base it imports itself (debootstrap), by that image's digest.
ARG BASE_IMAGE=BASE_IMAGE-is-required-name@sha256:digest

# -- stage 1: build the wheel and a virtualenv with the runtime dependencies only ---------------
FROM ${BASE_IMAGE} AS build
ARG BASE_IMAGE
RUN digest="${BASE_IMAGE##*@sha256:}"; \
    if [ "$digest" = "$BASE_IMAGE" ] || [ "${#digest}" -ne 64 ] \
       || [ -n "$(printf '%s' "$digest" | tr -d '0-9a-f')" ]; then \
      echo "BASE_IMAGE=$BASE_IMAGE is not pinned by digest: pass --build-arg BASE_IMAGE=NAME@sha256:<64 hex digits> (docs/production.md)" >&2; \
      exit 1; \
    fi
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY ca ./ca
COPY broker ./broker
# A TLS-intercepting proxy's CA for pip, if the build network has one:
#   podman build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# (a build secret: it is never written into a layer).
RUN --mount=type=secret,id=ca,target=/run/secrets/ca.pem \
    if [ -s /run/secrets/ca.pem ]; then export PIP_CERT=/run/secrets/ca.pem; fi \
 && python3 -m venv /opt/broker/venv \
 && /opt/broker/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && /opt/broker/venv/bin/pip install --no-cache-dir /wheels/*.whl \
 && /opt/broker/venv/bin/pip uninstall -y pip

# -- stage 2: the runtime -----------------------------------------------------------------------
FROM ${BASE_IMAGE}
# libatomic1: regopy's shared library needs libatomic.so.1, which the slim base lacks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 softhsm2 libatomic1 openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/broker --shell /usr/sbin/nologin broker \
 && install -d -o broker -g broker -m 0700 /var/lib/broker /var/lib/broker/tokens \
 && install -d -m 0755 /etc/broker \
 && printf '%s\n' 'directories.tokendir = /var/lib/broker/tokens' 'objectstore.backend = file' \
      'log.level = ERROR' 'slots.removable = false' > /etc/broker/softhsm2.conf \
 && chmod 0644 /etc/broker/softhsm2.conf
COPY --from=build /opt/broker/venv /opt/broker/venv
# SoftHSM2 tokens live in the data volume: `--dev` keeps its own token under DATA_DIR/hsm; a
# production token is made with `softhsm2-util --init-token` under this config (docs/production.md).
ENV PATH=/opt/broker/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SOFTHSM2_CONF=/etc/broker/softhsm2.conf \
    BROKER_DATA_DIR=/var/lib/broker \
    BROKER_LISTEN=0.0.0.0:8443 \
    BROKER_ATTEST_LISTEN=0.0.0.0:8444 \
    BROKER_METRICS_LISTEN=0.0.0.0:9464 \
    BROKER_SERVER_NAMES=localhost,127.0.0.1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/broker
VOLUME /var/lib/broker
# 8443 mTLS API, 8444 attestation (agents' join tokens and JWTs), 9464 Prometheus /metrics.
EXPOSE 8443 8444 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["broker", "health"]
ENTRYPOINT ["broker"]
CMD ["serve", "--dev"]
