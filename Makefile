# veil — build, test and benchmark. `make help` lists the targets.
GO       ?= go
# sudo's secure_path drops /usr/local/go/bin: keep it reachable for `sudo make demo`.
export PATH := $(PATH):/usr/local/go/bin
PKGS     ?= ./...
BENCHTIME ?= 1s
BIN      := bin

.PHONY: all build generate check-generate test unit check fmt fmt-check vet bench fuzz demo clean help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

build: ## build every binary into bin/
	$(GO) build -o $(BIN)/ ./cmd/...

demo: build ## the lab mesh with the Istio docs' scenarios (root; tears down after itself)
	$(BIN)/veilctl lab demo

generate: ## regenerate committed generated code (bpf2go, protoc)
	$(GO) generate ./...

check-generate: ## fail if committed generated code is stale: bpf2go output of bpf/capture.c (needs clang, llvm-strip, libbpf-dev), api/*.pb.go of api/*.proto (needs protoc)
	$(GO) generate ./bpf/...
	@if ! git diff --quiet -- 'bpf/*_bpfe[lb].go' 'bpf/*_bpfe[lb].o' || \
		[ -n "$$(git ls-files --others --exclude-standard -- 'bpf/*_bpfe[lb].go' 'bpf/*_bpfe[lb].o')" ]; then \
		echo "check-generate: committed bpf2go output is stale; run 'make generate' and commit:"; \
		git status --short -- 'bpf/*_bpfe[lb].go' 'bpf/*_bpfe[lb].o'; exit 1; fi
	$(GO) generate ./api/...
	@if ! git diff --quiet -- 'api/*.pb.go' || \
		[ -n "$$(git ls-files --others --exclude-standard -- 'api/*.pb.go')" ]; then \
		echo "check-generate: committed protoc output is stale; run 'make generate' and commit:"; \
		git status --short -- 'api/*.pb.go'; exit 1; fi

test: check check-generate unit ## the README's test command: gofmt check, go vet, generated code current, all tests

unit: ## go test every package (privileged tests need root)
	$(GO) test -count=1 -timeout 30m $(PKGS)

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

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	./scripts/fuzz.sh $${FUZZTIME:-30s}

clean:
	rm -rf $(BIN)
