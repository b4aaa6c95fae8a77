# Shortcuts for the image and the backend stack.
#
#   make image        uplink:<version> and uplink:latest from the Dockerfile
#                     (pulls the Rust image to build the binary)
#   make image-local  the same Dockerfile with no registry: the binary built
#                     on this host, a local busybox image as the build stage
#   make up           the backend from compose.yaml, in the background
#   make down         stops it (its volume, with agents and tokens, stays)
#   make logs         follows its log
#   make up-ha        the replicated backend from compose.ha.yaml (PostgreSQL,
#                     three replicas, HAProxy on one port), in the background
#   make down-ha      stops it (its volumes, database and CA, stay)
#   make logs-ha      follows its logs
#   make stand-in-images
#                     local images in place of postgres:15 and haproxy:2.6,
#                     from Debian's packages (a mirror, no registry)

VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE   := $(shell git remote get-url origin 2>/dev/null)
IMAGE    ?= uplink
COMPOSE  ?= $(shell docker compose version >/dev/null 2>&1 && echo 'docker compose' || echo docker-compose)
LOCAL_BASE := uplink-build-local:1
COMPOSE_HA = $(COMPOSE) -f compose.ha.yaml

BUILD_ARGS = --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
             --build-arg SOURCE=$(SOURCE) -t $(IMAGE):$(VERSION) -t $(IMAGE):latest

.PHONY: image image-local local-base up down logs up-ha down-ha logs-ha \
        stand-in-images

image:
	docker build $(BUILD_ARGS) .

image-local: local-base
	scripts/static-binary build/uplink
	docker build -q $(BUILD_ARGS) --build-arg RUST_IMAGE=$(LOCAL_BASE) \
	  --build-arg PREBUILT=build/uplink .

# busybox (Debian's busybox-static) and this host's CA bundle: what the
# build stage needs when the binary comes from the host.
local-base:
	@docker image inspect $(LOCAL_BASE) >/dev/null 2>&1 || { \
	  set -e; d=$$(mktemp -d); \
	  mkdir -p $$d/bin $$d/etc/ssl/certs; \
	  cp /bin/busybox $$d/bin/busybox; \
	  for a in sh cp mkdir chmod echo; do ln -s busybox $$d/bin/$$a; done; \
	  cp /etc/ssl/certs/ca-certificates.crt $$d/etc/ssl/certs/; \
	  tar -C $$d -c . | docker import - $(LOCAL_BASE) >/dev/null; \
	  rm -rf $$d; }

up:
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs -f

up-ha:
	$(COMPOSE_HA) up -d

down-ha:
	$(COMPOSE_HA) down

logs-ha:
	$(COMPOSE_HA) logs -f

stand-in-images:
	scripts/stand-in-images
