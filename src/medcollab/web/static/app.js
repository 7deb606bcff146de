// medcollab's small behaviours for its server-rendered pages. Loaded as a file (the pages' CSP
// allows no inline script); every page works without it except the "verify" button.
//
// * HTMX requests carry the session's CSRF token in X-CSRF-Token (from <meta name="csrf-token">).
// * The idle-timeout warning: shown shortly before the server would end the session.
// * Emergency-access dialog: a native <dialog>, opened from its link.
// * Times are shown in the reader's time zone (the server writes UTC).
// * "Verify" on the access history: recomputes an audit entry's Merkle inclusion proof with
//   WebCrypto SHA-256 (RFC 6962 / RFC 9162) and compares the root with the published checkpoint.
"use strict";

(function () {
  function meta(name) {
    var element = document.querySelector('meta[name="' + name + '"]');
    return element ? element.getAttribute("content") : "";
  }

  // CSRF for HTMX ------------------------------------------------------------------------------

  document.addEventListener("htmx:configRequest", function (event) {
    var token = meta("csrf-token");
    if (token) {
      event.detail.headers["X-CSRF-Token"] = token;
    }
  });

  // Idle timeout -------------------------------------------------------------------------------

  function setUpIdleWarning() {
    var seconds = parseInt(meta("idle-timeout"), 10);
    var warning = document.getElementById("idle-warning");
    if (!seconds || !warning) {
      return;
    }
    // Warn a minute ahead (a quarter of the timeout for very short ones).
    var warnAhead = Math.min(60, seconds / 4) * 1000;
    var deadline = 0;
    var stay = document.getElementById("idle-stay");

    function reset() {
      deadline = Date.now() + seconds * 1000;
      warning.hidden = true;
    }

    function expire() {
      window.location.assign("/login?expired=1");
    }

    function tick() {
      var remaining = deadline - Date.now();
      if (remaining <= 0) {
        expire();
      } else if (remaining <= warnAhead && warning.hidden) {
        warning.hidden = false;
        if (stay) {
          stay.focus();
        }
      }
    }

    if (stay) {
      stay.addEventListener("click", function () {
        fetch("/session/ping", { credentials: "same-origin", cache: "no-store" }).then(
          function (response) {
            if (response.status === 204) {
              reset();
            } else {
              expire();
            }
          },
          expire
        );
      });
    }
    document.addEventListener("htmx:afterRequest", reset);
    reset();
    window.setInterval(tick, 1000);
  }

  // Dialogs ------------------------------------------------------------------------------------

  function setUpDialogs() {
    document.querySelectorAll("[data-dialog]").forEach(function (opener) {
      var dialog = document.getElementById(opener.getAttribute("data-dialog"));
      if (!dialog || typeof dialog.showModal !== "function") {
        return; // Without <dialog> support the link leads to the form's own page.
      }
      opener.addEventListener("click", function (event) {
        event.preventDefault();
        dialog.showModal();
        var field = dialog.querySelector("textarea, input:not([type=hidden])");
        if (field) {
          field.focus();
        }
      });
    });
    document.querySelectorAll("[data-close-dialog]").forEach(function (button) {
      button.addEventListener("click", function () {
        var dialog = button.closest("dialog");
        if (dialog && dialog.open && typeof dialog.close === "function") {
          dialog.close();
        }
        if (dialog && dialog.hasAttribute("open")) {
          // A dialog rendered open (the page without script) has nowhere to close to.
          window.location.assign("/clinic/patients");
        }
      });
    });
  }

  // Local times ----------------------------------------------------------------------------------

  function localiseTimes() {
    var lang = document.documentElement.lang || undefined;
    // Only times the server wrote with a clock time carry the " UTC" suffix; dates stay as they are.
    document.querySelectorAll("time[datetime]").forEach(function (element) {
      var text = element.textContent || "";
      if (!/ UTC$/.test(text)) {
        return;
      }
      var moment = new Date(element.getAttribute("datetime"));
      if (isNaN(moment.getTime())) {
        return;
      }
      element.title = text;
      element.textContent = moment.toLocaleString(lang, { dateStyle: "medium", timeStyle: "short" });
    });
  }

  function setUpCountdowns() {
    document.querySelectorAll("[data-countdown]").forEach(function (element) {
      var until = new Date(element.getAttribute("data-countdown")).getTime();
      var template = element.getAttribute("data-template") || "%(minutes)s";
      function update() {
        var minutes = Math.max(0, Math.ceil((until - Date.now()) / 60000));
        element.textContent = template.replace("%(minutes)s", String(minutes));
        if (minutes === 0) {
          window.location.reload();
        }
      }
      update();
      window.setInterval(update, 30000);
    });
  }

  // Audit proof verification -------------------------------------------------------------------

  function fromBase64(text) {
    var binary = window.atob(text);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes;
  }

  function sha256(bytes) {
    return window.crypto.subtle.digest("SHA-256", bytes).then(function (digest) {
      return new Uint8Array(digest);
    });
  }

  // RFC 6962: an interior node is SHA-256(0x01 || left || right).
  function nodeHash(left, right) {
    var joined = new Uint8Array(1 + left.length + right.length);
    joined[0] = 1;
    joined.set(left, 1);
    joined.set(right, 1 + left.length);
    return sha256(joined);
  }

  // RFC 9162 section 2.1.3.2: the root that an inclusion path leads to from a leaf hash.
  function rootFromPath(leaf, index, size, path) {
    if (!(index >= 0 && index < size)) {
      return Promise.reject(new Error("leaf index outside the tree"));
    }
    var fn = index;
    var sn = size - 1;
    var chain = Promise.resolve(leaf);
    path.forEach(function (sibling) {
      chain = chain.then(function (r) {
        if (sn === 0) {
          throw new Error("path longer than the tree is deep");
        }
        var next;
        if (fn % 2 === 1 || fn === sn) {
          next = nodeHash(sibling, r);
          while (fn !== 0 && fn % 2 === 0) {
            fn = Math.floor(fn / 2);
            sn = Math.floor(sn / 2);
          }
        } else {
          next = nodeHash(r, sibling);
        }
        fn = Math.floor(fn / 2);
        sn = Math.floor(sn / 2);
        return next;
      });
    });
    return chain.then(function (r) {
      if (sn !== 0) {
        throw new Error("path shorter than the tree is deep");
      }
      return r;
    });
  }

  function sameBytes(a, b) {
    if (a.length !== b.length) {
      return false;
    }
    var difference = 0;
    for (var i = 0; i < a.length; i++) {
      difference |= a[i] ^ b[i];
    }
    return difference === 0;
  }

  // A C2SP checkpoint: origin, tree size, base64 root hash, then a blank line and signatures.
  function parseCheckpoint(note) {
    var lines = note.split("\n");
    if (lines.length < 4 || !/^[0-9]+$/.test(lines[1])) {
      throw new Error("malformed checkpoint");
    }
    var root = fromBase64(lines[2]);
    if (root.length !== 32) {
      throw new Error("malformed root hash");
    }
    return { origin: lines[0], size: parseInt(lines[1], 10), root: root };
  }

  function setUpVerification() {
    var messages = document.getElementById("verify-messages");
    if (!messages) {
      return;
    }
    document.querySelectorAll("button.verify").forEach(function (button) {
      var result = button.parentElement.querySelector(".verify-result");
      function show(state, text) {
        result.setAttribute("data-state", state);
        result.className = "verify-result " + state;
        result.textContent = text;
        button.disabled = false;
      }
      button.addEventListener("click", function () {
        button.disabled = true;
        show("checking", messages.getAttribute("data-checking"));
        button.disabled = true;
        var checkpoint;
        fetch("/audit/checkpoint", { credentials: "same-origin", cache: "no-store" })
          .then(function (response) {
            if (!response.ok) {
              throw new Error("no checkpoint");
            }
            return response.text();
          })
          .then(function (note) {
            checkpoint = parseCheckpoint(note);
            var url = button.getAttribute("data-proof-url") + "&size=" + checkpoint.size;
            return fetch(url, { credentials: "same-origin", cache: "no-store" });
          })
          .then(function (response) {
            if (!response.ok) {
              throw new Error("no proof");
            }
            return response.json();
          })
          .then(function (proof) {
            var leaf = fromBase64(proof.leaf_hash);
            var listed = fromBase64(button.getAttribute("data-leaf-hash"));
            if (proof.tree_size !== checkpoint.size || !sameBytes(leaf, listed)) {
              return false;
            }
            var path = proof.inclusion_path.map(fromBase64);
            return rootFromPath(leaf, proof.leaf_index, checkpoint.size, path).then(
              function (root) {
                return sameBytes(root, checkpoint.root);
              },
              function () {
                return false;
              }
            );
          })
          .then(
            function (verified) {
              if (verified) {
                var text = messages.getAttribute("data-verified");
                show("verified", text.replace("%(size)s", String(checkpoint.size)));
              } else {
                show("failed", messages.getAttribute("data-failed"));
              }
            },
            function () {
              show("unavailable", messages.getAttribute("data-unavailable"));
            }
          );
      });
    });
  }

  // Upload forms: refuse files over the server's limit before sending them, with the page's own
  // (translated) message. The server enforces the limit anyway; this saves a long upload.
  function setUpFileLimits() {
    document.querySelectorAll("input[type=file][data-max-bytes]").forEach(function (input) {
      var form = input.form;
      var error = document.getElementById(input.id + "-error");
      if (!form || !error) {
        return;
      }
      form.addEventListener("submit", function (event) {
        var total = 0;
        Array.prototype.forEach.call(input.files || [], function (file) {
          total += file.size;
        });
        if (total > Number(input.getAttribute("data-max-bytes"))) {
          event.preventDefault();
          error.textContent = input.getAttribute("data-too-large");
          error.hidden = false;
          input.setAttribute("aria-invalid", "true");
          input.focus();
        } else {
          error.hidden = true;
          input.removeAttribute("aria-invalid");
        }
      });
    });
  }

  function start() {
    setUpFileLimits();
    setUpIdleWarning();
    setUpDialogs();
    localiseTimes();
    setUpCountdowns();
    setUpVerification();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
