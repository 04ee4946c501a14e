# veil — build, test and benchmark. `make help` lists the targets.
GO       ?= go
# sudo's secure_path drops /usr/local/go/bin: keep it reachable for `sudo make demo`.
export PATH := $(PATH):/usr/local/go/bin
PKGS     ?= ./...
BENCHTIME ?= 1s
BIN      := bin

.PHONY: all build generate check-generate test unit interop kube-build images images-test manifests helm-test check fmt fmt-check vet bench bench-path fuzz demo deps-demo deps-test clean help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: ## build every binary into bin/
	$(GO) build -o $(BIN)/ ./cmd/...

demo: deps-demo build ## the lab mesh with the Istio docs' scenarios (root; tears down after itself)
	$(BIN)/veilctl lab demo

deps-demo: ## install what `make demo` needs where missing (Debian/Ubuntu as root; elsewhere prints the packages)
	./scripts/deps.sh demo

deps-test: ## install what `make test` needs where missing (Debian/Ubuntu as root; elsewhere prints the packages)
	./scripts/deps.sh test

generate: ## regenerate committed generated code (bpf2go, protoc)
	$(GO) generate ./...

check-generate: ## fail if committed generated code is stale (api always; bpf where the recorded clang is present, and always in CI)
	./scripts/check-generate.sh

test: deps-test kube-build check check-generate unit interop images-test helm-test ## the README's test command: installs what is missing, gofmt check, go vet, generated code current, all tests

kube-build: ## build (once; cached in ~/.cache/veil) the kube-apiserver and kubectl the Kubernetes tests run
	@./scripts/kube-build.sh >/dev/null

unit: ## go test every package (privileged tests need root)
	$(GO) test -count=1 -timeout 30m $(PKGS)

images: ## OCI image archives of the static binaries on an empty base (bin/images/*.tar: docker load, kind load image-archive), without a Docker engine
	cd deploy/images && $(GO) run . -out $(abspath $(BIN))/images -tag $${TAG:-dev}

images-test: ## build the image archives into a temporary directory and check them
	cd deploy/images && $(GO) test -count=1 -timeout 20m ./...

manifests: ## regenerate from the Helm chart deploy/helm/veil: its CRD files (istio.io/api, gateway-api modules) and deploy/manifests/veil.yaml
	cd deploy/helm/render && $(GO) run .

helm-test: ## the Helm chart: its shape with default and other values, helm lint, generated files current, install/upgrade/uninstall on a real API server
	cd deploy/helm/render && $(GO) test -count=1 -timeout 20m ./...

interop: ## interop tests against Istio's own Go code (HBONE both ways, Istio's CA client); a module of its own, interop/
	cd interop && $(GO) test -count=1 ./...

check: fmt-check vet ## static checks only

fmt: ## rewrite files with gofmt
	gofmt -w $$(git ls-files '*.go')

fmt-check: ## fail if any file needs gofmt
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfe[lb].go$$')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet: ## go vet
	$(GO) vet $(PKGS)

bench: ## benchmarks with allocation counts; figures go into closing notes
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) $(PKGS)

bench-path: ## end-to-end: raw TCP, a plain Go TLS tunnel, stunnel and veil over the lab's two nodes (root; QUICK=1 to try it); then the waypoint's HTTP proxy against httputil.ReverseProxy
	./scripts/deps.sh bench
	$(MAKE) --no-print-directory build
	BIN=$(abspath $(BIN)) ./bench/path.sh
	$(GO) test -run '^$$' -bench '^(BenchmarkProxyHTTP1|BenchmarkRouterDecide)$$' -benchtime 3s ./waypoint/

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	./scripts/fuzz.sh $${FUZZTIME:-30s}

clean:
	rm -rf $(BIN)
