// The keystile console's only script: copy buttons, the key-type fields, and closing an
// open ⋮ menu with Escape. Everything works without it, except copying to the clipboard.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var field = document.getElementById(button.getAttribute("data-copy"));
      var status = document.getElementById(button.getAttribute("data-status"));
      var done = function (text) { if (status) { status.textContent = text; } };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(field.value).then(
          function () { done("Copied to the clipboard."); },
          function () { field.select(); done("Select the key and copy it (Ctrl+C)."); }
        );
      } else {
        field.select();
        done("Select the key and copy it (Ctrl+C).");
      }
    });
  });
  // Only the fields of the chosen key type: the others are hidden and not sent.
  var types = document.querySelectorAll("input[name=type]");
  var sync = function () {
    var chosen = document.querySelector("input[name=type]:checked");
    document.querySelectorAll("fieldset[data-for-type]").forEach(function (set) {
      var show = !chosen || set.getAttribute("data-for-type").split(" ").indexOf(chosen.value) >= 0;
      set.hidden = !show;
      set.disabled = !show;
    });
  };
  types.forEach(function (input) { input.addEventListener("change", sync); });
  if (types.length) { sync(); }
  document.addEventListener("keydown", function (event) {
    if (event.key !== "Escape") { return; }
    document.querySelectorAll("details.menu[open]").forEach(function (menu) {
      menu.open = false;
      menu.querySelector("summary").focus();
    });
  });
});
