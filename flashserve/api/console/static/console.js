// Shared console behaviour: the theme toggle, copy buttons, tabs and confirmations. No inline script
// anywhere (the CSP forbids it); nothing here touches an API key.
(function () {
  "use strict";
  const root = document.documentElement;
  const saved = localStorage.getItem("flashserve-theme");  // only "light" / "dark": a display preference
  if (saved === "light" || saved === "dark") root.dataset.theme = saved;

  document.addEventListener("DOMContentLoaded", function () {
    const toggle = document.getElementById("theme-toggle");
    if (toggle) toggle.addEventListener("click", function () {
      const dark = root.dataset.theme ? root.dataset.theme === "dark"
        : window.matchMedia("(prefers-color-scheme: dark)").matches;
      root.dataset.theme = dark ? "light" : "dark";
      localStorage.setItem("flashserve-theme", root.dataset.theme);
    });

    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.addEventListener("click", function () {
        const target = document.querySelector(button.dataset.copy);
        if (!target) return;
        const done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(target.textContent).then(done, function () { selectText(target); });
        } else { selectText(target); document.execCommand("copy"); done(); }
      });
    });

    document.querySelectorAll("[data-tabs]").forEach(function (tabs) {
      tabs.querySelectorAll("[data-tab]").forEach(function (tab) {
        tab.addEventListener("click", function () {
          tabs.querySelectorAll("[data-tab]").forEach(function (other) {
            other.classList.toggle("active", other === tab);
            const panel = document.getElementById(other.dataset.tab);
            if (panel) panel.classList.toggle("hidden", other !== tab);
          });
        });
      });
    });

    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  });

  function selectText(node) {
    const range = document.createRange();
    range.selectNodeContents(node);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
})();
