;; A balancer written in the component-model text format: its `select`
;; grows a table without bound (65,536 elements at a time) until the host
;; refuses, then traps. No Rust toolchain emits `table.grow` on demand, hence
;; the text format. `init` accepts any config; `backends-changed` ignores
;; the list. The contract's types are exported so that the functions that
;; use them are valid exports.
(component
  (core module $m
    (memory (export "memory") 1)
    (table $t 1 funcref)
    (global $bump (mut i32) (i32.const 1024))
    ;; A bump allocator: (old ptr, old size, align, new size) -> aligned ptr.
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p
        (i32.and
          (i32.add (global.get $bump) (i32.sub (local.get 2) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get 2))))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    (func (export "init") (param i32 i32) (result i32) (i32.const 16))
    (func (export "backends-changed") (param i32 i32))
    (func (export "select") (param i64 i64 i32 i64 i64 i32 i32) (result i32)
      (loop $grow
        (br_if $grow (i32.ne (table.grow $t (ref.null func) (i32.const 65536)) (i32.const -1))))
      unreachable)
  )
  (core instance $i (instantiate $m))
  (type $ip0 (record (field "hi" u64) (field "lo" u64)))
  (export $ip "ip" (type $ip0))
  (type $protocol0 (enum "tcp" "udp"))
  (export $protocol "protocol" (type $protocol0))
  (type $flow0 (record (field "client-ip" $ip) (field "client-port" u16) (field "frontend-ip" $ip) (field "frontend-port" u16) (field "protocol" $protocol)))
  (export $flow "flow" (type $flow0))
  (type $state0 (enum "unknown" "up" "down" "draining"))
  (export $state "backend-state" (type $state0))
  (type $backend0 (record (field "id" u32) (field "ip" $ip) (field "port" u16) (field "weight" u32) (field "state" $state)))
  (export $backend "backend" (type $backend0))
  (type $selection0 (variant (case "backend" u32) (case "reject")))
  (export $selection "selection" (type $selection0))
  (func (export "init") (param "config" string) (result (result (error string)))
    (canon lift (core func $i "init") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "backends-changed") (param "backends" (list $backend))
    (canon lift (core func $i "backends-changed") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
  (func (export "select") (param "flow" $flow) (result $selection)
    (canon lift (core func $i "select") (memory (core memory $i "memory"))))
)
