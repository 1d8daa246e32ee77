# eidetica-node in a container: one node per container, its data in the /data volume.
#
#   docker build -t eidetica-node .
#   docker run -d --name node1 -v node1-data:/data -p 4001:4001 -p 8080:8080 eidetica-node
#   docker exec node1 eidetica-node db create notes       # every command reaches the node
#   docker exec -it node1 eidetica-node status            # the TUI
#
# docker-compose.yml runs a relay and three nodes on two isolated networks with this image.

# ---- build: fastecdsa (a libp2p dependency) has no wheel and compiles against GMP ----------
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgmp-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/eidetica
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dag ./dag
COPY sync ./sync
COPY transports ./transports
COPY node ./node
RUN /opt/eidetica/bin/pip install --no-cache-dir --disable-pip-version-check .

# ---- runtime ----------------------------------------------------------------------------------
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgmp10 \
    && rm -rf /var/lib/apt/lists/*
# A fixed UID, so volumes keep working across rebuilds. /data and /mesh are created owned by
# it: Docker copies that ownership into a fresh named volume mounted there.
RUN groupadd --system --gid 10001 eidetica \
    && useradd --system --uid 10001 --gid eidetica --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin eidetica \
    && install -d -o eidetica -g eidetica -m 0700 /data \
    && install -d -o eidetica -g eidetica -m 0755 /mesh
COPY --from=build /opt/eidetica /opt/eidetica
# The entrypoint of docker-compose.yml's mesh (relay / seed / peer roles around `eidetica-node run`).
COPY scripts/mesh-node.sh /usr/local/bin/mesh-node
ENV PATH=/opt/eidetica/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EIDETICA_DATA_DIR=/data
USER eidetica
WORKDIR /data
VOLUME ["/data"]
# 4001: libp2p (TCP); 8080: the HTTP sync transport. The control API is a unix socket in /data.
EXPOSE 4001 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["eidetica-node", "health"]
ENTRYPOINT ["eidetica-node"]
CMD ["run", "--p2p-listen", "/ip4/0.0.0.0/tcp/4001", "--http-bind", "0.0.0.0:8080"]
