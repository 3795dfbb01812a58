# Sourced by the CI steps whose builds prove a path rather than measure speed (the aarch64
# smoke under qemu, the wgpu test on lavapipe): their CPU training is a few hundred samples
# at most, so burn's CPU crates build unoptimised there. tract keeps opt-level 3.
#
# Cargo `--config` overrides rather than a profile of their own: a named profile would also
# rebuild the host's build scripts and proc macros, which these builds otherwise reuse from
# the native one. Timings are in BENCHMARKS.md ("CI wall time").
unoptimised_burn=()
for crate in burn burn-autodiff burn-backend burn-core burn-dispatch burn-ir burn-linalg \
             burn-flex burn-ndarray burn-nn burn-optim burn-std burn-tensor macerator; do
    unoptimised_burn+=(--config "profile.dev.package.$crate.opt-level=0")
done
