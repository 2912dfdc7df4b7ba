# One image for every component: `fleetscan broker|agent|worker|up`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p fleetscan-cli

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/fleetscan /usr/local/bin/fleetscan
ENTRYPOINT ["/usr/local/bin/fleetscan"]
CMD ["--help"]
