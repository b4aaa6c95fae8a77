# One image for the agent, the backend and ctl: a static `uplink` binary,
# CA certificates and an empty state directory on an empty base.
#
#   make image         # docker build -t uplink:<version> -t uplink:latest .
#
# The build stage's image is a build argument. With a registry the default
# builds the binary here (scripts/static-binary). Where no registry is
# reachable, `make image-local` builds the binary on the host with the same
# script and gives its path as PREBUILT, with a local image (busybox and a
# CA bundle) as RUST_IMAGE: the same file, the same final stage.
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# A static binary already built by scripts/static-binary, as a path in the
# build context; empty to build it here.
ARG PREBUILT=
RUN set -eu; \
    mkdir -p /out/etc/ssl/certs /out/var/lib/uplink /out/tmp; \
    if [ -n "$PREBUILT" ]; then cp "$PREBUILT" /out/uplink; \
    else sh scripts/static-binary /out/uplink; fi; \
    chmod 0755 /out/uplink; \
    cp /etc/ssl/certs/ca-certificates.crt /out/etc/ssl/certs/; \
    echo 'uplink:x:10001:10001:uplink:/var/lib/uplink:/uplink' >/out/etc/passwd; \
    echo 'uplink:x:10001:' >/out/etc/group; \
    chmod 1777 /out/tmp

FROM scratch
ARG VERSION=unknown
ARG REVISION=unknown
ARG SOURCE=
LABEL org.opencontainers.image.title="uplink" \
      org.opencontainers.image.description="Outbound-only host agent, its backend and ctl" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
COPY --from=build /out/uplink /uplink
COPY --from=build /out/etc/ /etc/
COPY --from=build /out/tmp /tmp
COPY --from=build --chown=10001:10001 /out/var/lib/uplink /var/lib/uplink
# The agent keeps its identity and spool here, the backend its database and
# CA: a volume in both cases (see README.md, "Add a host" and compose.yaml).
ENV UPLINK_STATE_DIR=/var/lib/uplink \
    UPLINK_DATA_DIR=/var/lib/uplink
VOLUME ["/var/lib/uplink"]
# Not root by default. The agent reaches the Docker socket with
# `--group-add <the socket's group>` (the line the backend prints does it).
USER 10001:10001
EXPOSE 8443
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/uplink", "health"]
ENTRYPOINT ["/uplink"]
CMD ["agent"]
