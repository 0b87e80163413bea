# __noChroot: asks to build outside the sandbox (allowed only with sandbox = relaxed).
import ./lib/mk.nix {
  name = "no-chroot";
  __noChroot = true;
  script = "echo outside the chroot > $out";
}
