package api

//go:generate ./protoc.sh
