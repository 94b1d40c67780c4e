/*
 * The staged rollout state machine of broker/rollout/ (machine.py, service.py), checked with
 * spin by tests/unit/broker/rollout/test_model.py (about 0.7 M states, some 10 s):
 *
 *   spin -a rollout.pml && gcc -O2 -DNFAIR=3 -o pan pan.c && ./pan -a -f -N failed_rolls_back
 *
 * (-a -f: acceptance cycles under weak fairness, for the LTL property; assertions are checked
 * in the same run.)
 *
 * What is modelled: a secret with an old (1) and a new (2) version; N = 2 consumers, one in each
 * of NS = 2 stages (the canary and the rest; in the code placed by a hash of its SPIFFE ID); the broker's start
 * (pending -> new version written -> running), its bake timer, the operator's promote and
 * abort, consumers' reads (routed by the rollout, then revealed: a revoked version is refused
 * and the read routed again, as SecretService.get does) and reports (healthy, or not when the
 * new version is bad), and crashes of the broker between any two of its writes, after which
 * it restarts and settles the unfinished step from what storage holds (RolloutService.tick).
 * Storage writes are atomic (one transaction each in the code); anything else interleaves.
 *
 * Timing assumption (the bake time is longer than consumers' refresh interval, see
 * docs/rotation.md): a stage's bake ends only after every running consumer of the open
 * stages has read since the stage opened. A consumer may stop at any time; the broker no
 * longer counts it.
 *
 * Properties:
 *  - assert in Consumer: a consumer is never left on a revoked version (its read once the
 *    rollout has finished gets a version that is not revoked);
 *  - assert in Broker: the old version is never revoked while a running consumer uses it;
 *  - ltl failed_rolls_back: a failed stage (a failing report beyond --max-failures, or a
 *    stage not healthy when its bake ends) always ends in rollback.
 *
 * Broken variants, which spin must refute (the test checks it does):
 *  -DBROKEN_NO_ROLLBACK   the bake timer opens the next stage even when the stage is unhealthy
 *                         and a failing report only counts (no rollback guard);
 *  -DBROKEN_EARLY_REVOKE  completion does not wait for consumers to be on the new version;
 *  -DBROKEN_ROUTE_OLD     a finished rollout still routes reads to the old version.
 */

#define OLD 1
#define NEW 2
#define N 2
#define NS 2
#define MAXF 0
#define MAXCRASH 2

mtype = { PENDING, RUNNING, COMPLETING, ROLLING_BACK, ABORTING, COMPLETED, ROLLED_BACK, ABORTED };

/* Storage (survives a broker crash). */
mtype state = PENDING;
byte open_stage = 0;
byte failures = 0;
bool written = false;      /* the new version exists */
byte current = OLD;        /* the secret's current version */
bool revoked[3];           /* by version */
byte served[N];            /* the version each consumer was last served */
bool seen[N];              /* read since the open stage opened */
bool unhealthy[N];         /* its last report failed */

/* The world. */
bool bad_new;              /* the new version breaks its consumers */
bool stage_failed;         /* ghost: a stage failed */
bool operator_aborted;
byte crashes = 0;
byte stage_of[N];
bool running[N];            /* the consumer runs */
byte holds[N];             /* the version the consumer uses */

#define terminal (state == COMPLETED || state == ROLLED_BACK || state == ABORTED)
#define in_open(i) (stage_of[i] <= open_stage)
#define bake_may_end(i) (!running[i] || !in_open(i) || seen[i])
#define all_baked (bake_may_end(0) && bake_may_end(1))
#ifdef BROKEN_EARLY_REVOKE
#define consumer_ok(i) (!in_open(i) || !seen[i] || !unhealthy[i])
#else
#define consumer_ok(i) (!in_open(i) || !seen[i] || (served[i] == NEW && !unhealthy[i]))
#endif
#define stage_healthy (failures <= MAXF && consumer_ok(0) && consumer_ok(1))

/* machine.routed_version; after the rollout, reads are not routed: the current version. */
inline route(i, v) {
  if
  :: state == RUNNING && written && in_open(i) -> v = NEW
  :: state == COMPLETING -> v = NEW
#ifdef BROKEN_ROUTE_OLD
  :: terminal -> v = OLD
#else
  :: terminal -> v = current
#endif
  :: else -> v = OLD
  fi
}

inline open_next() {
  open_stage++;
  seen[0] = false; seen[1] = false
}

/* A crash between two writes: the broker restarts and settles from storage. */
inline crash_point() {
  if
  :: crashes < MAXCRASH -> crashes++; goto restart
  :: true -> skip
  fi
}

proctype Consumer(byte i) {
  byte v;
read:
  route(i, v);
  if
  :: revoked[v] -> goto read     /* the reveal refuses it: route again */
  :: else -> skip
  fi;
  atomic {
    holds[i] = v;
    if
    :: !terminal -> served[i] = v; seen[i] = true
    :: else -> skip
    fi
  }
  /* Its report (RolloutService.report_for). */
  if
  :: bad_new && v == NEW ->
    atomic {
      unhealthy[i] = true;
      if
      :: state == RUNNING ->
        failures++;
        if
        :: failures > MAXF ->
          stage_failed = true;
#ifndef BROKEN_NO_ROLLBACK
          state = ROLLING_BACK
#else
          skip
#endif
        :: else -> skip
        fi
      :: else -> skip
      fi
    }
  :: else -> unhealthy[i] = false
  fi;
  if
  :: terminal ->
    /* Its read after the rollout finished. */
    route(i, v);
    assert(!revoked[v]);
    holds[i] = v
  :: !terminal -> goto read
  :: running[i] = false           /* the workload stops */
  fi
}

proctype Broker() {
  bool healthy;
  byte stage_seen, failures_seen;
  /* Start: the pending rollout is stored (init); write the new version, then run. */
  crash_point();
  atomic { written = true; current = NEW }
  crash_point();
  atomic {
    if
    :: state == PENDING -> state = RUNNING
    :: else -> skip
    fi
  }
restart:
  do
  :: state == PENDING ->
    /* A start the broker did not finish: resume it if the new version was written. */
    atomic {
      if
      :: written -> state = RUNNING
      :: else -> state = ABORTED
      fi
    }
  :: state == RUNNING && all_baked ->
    /* The bake timer of the open stage ends (machine.on_timer): the consumers are read and
     * judged first, then the step is written by compare-and-set on (state, stage, failures),
     * as RolloutRepository.update does; a lost race changes nothing. */
    healthy = stage_healthy;
    stage_seen = open_stage;
    failures_seen = failures;
    atomic {
      if
      :: state == RUNNING && open_stage == stage_seen && failures == failures_seen ->
        if
        :: healthy && open_stage < NS - 1 -> open_next()
        :: healthy && open_stage == NS - 1 -> state = COMPLETING
        :: !healthy ->
          stage_failed = true;
#ifdef BROKEN_NO_ROLLBACK
          if
          :: open_stage < NS - 1 -> open_next()
          :: else -> state = COMPLETING
          fi
#else
          state = ROLLING_BACK
#endif
        fi
      :: else -> skip
      fi;
      healthy = false; stage_seen = 0; failures_seen = 0
    }
  :: atomic { state == RUNNING && open_stage < NS - 1 -> open_next() }   /* rollout promote */
  :: atomic {                                                           /* rollout abort */
      state == RUNNING && !operator_aborted -> operator_aborted = true; state = ABORTING
    }
  :: state == COMPLETING ->
    atomic {
      /* The old version is never revoked while a running consumer uses it. */
      assert(!(running[0] && holds[0] == OLD));
      assert(!(running[1] && holds[1] == OLD));
      revoked[OLD] = true
    }
    crash_point();
    state = COMPLETED
  :: state == ROLLING_BACK || state == ABORTING ->
    /* SecretService.rollback: the old version current again, the new one revoked. */
    atomic {
      if
      :: current == NEW -> current = OLD; revoked[NEW] = true
      :: else -> skip
      fi
    }
    crash_point();
    atomic {
      if
      :: state == ABORTING -> state = ABORTED
      :: else -> state = ROLLED_BACK
      fi
    }
  :: terminal -> break
  od
}

init {
  atomic {
    if
    :: bad_new = true
    :: bad_new = false
    fi;
    stage_of[0] = 0; stage_of[1] = 1;
    running[0] = true; running[1] = true;
    holds[0] = OLD; holds[1] = OLD;
    run Broker();
    run Consumer(0);
    run Consumer(1)
  }
}

ltl failed_rolls_back { [] (stage_failed -> <> (state == ROLLED_BACK)) }
