# The broker with SoftHSM2. Production runs mount a config file and a data volume:
#   docker run -v /etc/broker:/etc/broker -v broker-data:/var/lib/broker -p 8443:8443 \
#     credential-broker serve --config /etc/broker/broker.toml
# With no arguments it serves the embedded dev defaults in /var/lib/broker.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv softhsm2 openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/broker
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY ca ./ca
COPY broker ./broker
COPY loadtests ./loadtests
RUN python3 -m venv /opt/broker/.venv \
 && /opt/broker/.venv/bin/pip install --no-cache-dir . \
 && useradd --system --home /var/lib/broker broker \
 && mkdir -p /var/lib/broker && chown broker /var/lib/broker
USER broker
ENV PATH=/opt/broker/.venv/bin:$PATH
VOLUME /var/lib/broker
EXPOSE 8443
ENTRYPOINT ["broker"]
CMD ["serve", "--dev", "--data-dir", "/var/lib/broker", "--listen", "0.0.0.0:8443"]
